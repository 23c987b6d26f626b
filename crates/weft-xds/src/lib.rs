//! xDS v3 for the proxy: conversion of Envoy's resources into Weft's model ([`convert`], pure), the
//! accepted state and how it becomes a model ([`state`]), and the ADS client ([`client`]).

pub mod client;
pub mod convert;
pub mod dump;
pub mod received;
pub mod state;

pub use client::{Hooks, Outcome, ResourceType, XdsConfig, XdsStatus, spawn};
