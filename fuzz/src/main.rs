//! `weft-fuzz <target> [--seconds N] [--seed S]`: mutates a target's inputs until the time is up, and
//! saves the first input that fails under `fuzz/corpus/<target>/`, where the replay test then runs it
//! on every build. `weft-fuzz --list` names the targets.

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_none_or(|a| a == "--list") {
        for target in weft_fuzz::all() {
            println!("{}", target.name);
        }
        return;
    }
    let name = &args[0];
    let Some(target) = weft_fuzz::find(name) else {
        eprintln!("no target {name:?}; `weft-fuzz --list` names them");
        std::process::exit(2);
    };
    let flag = |flag: &str, default: u64| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map_or(Ok(default), |v| v.parse::<u64>())
            .unwrap_or_else(|_| {
                eprintln!("{flag} takes a number");
                std::process::exit(2)
            })
    };
    let seconds = flag("--seconds", 60);
    let mut seed = flag("--seed", u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15);
    // Panics are the findings; their messages are printed once, below.
    std::panic::set_hook(Box::new(|_| {}));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut total = 0;
    while Instant::now() < deadline {
        match weft_fuzz::replay(target, seed, 1_000) {
            Ok(ran) => total += ran,
            Err((input, message)) => {
                let dir = weft_fuzz::corpus_dir(target.name);
                let file = dir.join(format!("failure-seed-{seed:x}"));
                let saved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, &input));
                eprintln!("{}: {message}", target.name);
                match saved {
                    Ok(()) => eprintln!("input saved as {}", file.display()),
                    Err(err) => eprintln!("input not saved ({err}): {:?}", input),
                }
                std::process::exit(1);
            }
        }
        seed = seed.wrapping_add(1);
    }
    println!("{}: {total} inputs in {seconds} s, no failure", target.name);
}
