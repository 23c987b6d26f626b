//! The sidecar template, `deploy/injection/sidecar.yaml`, rendered for one pod.

use serde_yaml_ng::{Mapping, Value};

/// The one template both `weft inject` and the admission webhook render.
pub(crate) const TEMPLATE: &str = include_str!("../../../deploy/injection/sidecar.yaml");

/// The parts of a rendered template.
#[derive(Debug)]
pub(crate) struct Parts {
    pub(crate) init: Mapping,
    pub(crate) proxy: Mapping,
    /// The proxy's `lifecycle` when the app waits for it in a classic (non-native) sidecar.
    pub(crate) hold: Value,
    pub(crate) volumes: Vec<Value>,
}

/// Fills each `{{name}}` of `template` with the JSON text of its value, and reads the result.
pub(crate) fn render(template: &str, values: &[(&str, serde_json::Value)]) -> Result<Parts, String> {
    let mut text = template.to_owned();
    for (name, value) in values {
        let json = serde_json::to_string(value).map_err(|e| format!("template value {name}: {e}"))?;
        text = text.replace(&format!("{{{{{name}}}}}"), &json);
    }
    if let Some(at) = text.find("{{") {
        let rest = &text[at..];
        let name = rest.split("}}").next().unwrap_or(rest);
        return Err(format!(
            "the sidecar template names {name}}}}}, which has no value"
        ));
    }
    let value: Value = serde_yaml_ng::from_str(&text).map_err(|e| format!("the sidecar template: {e}"))?;
    let part = |key: &str| {
        value
            .get(key)
            .cloned()
            .ok_or_else(|| format!("the sidecar template has no `{key}`"))
    };
    let mapping = |key: &str| match part(key)? {
        Value::Mapping(m) => Ok(m),
        _ => Err(format!("the sidecar template's `{key}` is not a mapping")),
    };
    Ok(Parts {
        init: mapping("init")?,
        proxy: mapping("proxy")?,
        hold: part("hold")?,
        volumes: match part("volumes")? {
            Value::Sequence(v) => v,
            _ => return Err("the sidecar template's `volumes` is not a list".into()),
        },
    })
}
