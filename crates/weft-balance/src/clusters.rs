//! The state of every cluster, by name. The configuration task applies each new set of clusters before
//! the proxy uses it ([`ClusterStates::apply`]); requests find their cluster's state through an
//! atomically swapped map, without a lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use weft_model::Cluster;
use weft_telemetry::Metrics;

use crate::cluster::ClusterState;
use crate::status::ClusterStatus;

type States = HashMap<String, Arc<ClusterState>>;

#[derive(Debug)]
pub struct ClusterStates {
    states: ArcSwap<States>,
    /// Serializes writers; readers never take it.
    write: Mutex<()>,
    metrics: Arc<Metrics>,
}

impl ClusterStates {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            states: ArcSwap::default(),
            write: Mutex::new(()),
            metrics,
        }
    }

    /// Brings the states up to `clusters`: new clusters get a state, changed ones adopt their new
    /// configuration (keeping what is known about the endpoints that remain), and clusters no longer
    /// configured are forgotten.
    pub fn apply<'a>(&self, clusters: impl IntoIterator<Item = &'a Arc<Cluster>>) {
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.states.load_full();
        let mut next = States::new();
        for config in clusters {
            let state = match current.get(&config.name) {
                Some(state) => {
                    state.sync(config);
                    state.clone()
                }
                None => Arc::new(ClusterState::new(config.clone(), self.metrics.clone())),
            };
            next.insert(config.name.clone(), state);
        }
        for (name, state) in current.iter() {
            if !next.contains_key(name) {
                state.forget_metrics();
            }
        }
        self.states.store(Arc::new(next));
    }

    /// The state of `config`'s cluster. A cluster the states have not been given yet (a request racing
    /// the configuration task) gets one, which the next [`apply`](Self::apply) keeps or forgets.
    pub fn get(&self, config: &Arc<Cluster>) -> Arc<ClusterState> {
        if let Some(state) = self.states.load().get(&config.name) {
            return state.clone();
        }
        let _write = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.states.load_full();
        if let Some(state) = current.get(&config.name) {
            return state.clone();
        }
        let state = Arc::new(ClusterState::new(config.clone(), self.metrics.clone()));
        let mut next = States::clone(&current);
        next.insert(config.name.clone(), state.clone());
        self.states.store(Arc::new(next));
        state
    }

    /// What admin `GET /clusters` shows, sorted by cluster name.
    pub fn status(&self) -> Vec<ClusterStatus> {
        let mut status: Vec<_> = self.states.load().values().map(|s| s.status()).collect();
        status.sort_by(|a, b| a.name.cmp(&b.name));
        status
    }
}
