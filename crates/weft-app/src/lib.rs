//! The proxy, wired: [`App::build`] binds every listener and returns a [`Running`] proxy that serves until
//! told to stop, then drains.
//!
//! A connection's path reads top to bottom in [`outbound`] and [`inbound`]: accept, original destination,
//! decide where it goes, detect the protocol, then forward as HTTP or as opaque TCP ([`forward`]).

mod admin;
mod app;
mod destination;
mod detect;
mod forward;
mod inbound;
mod inputs;
mod outbound;
mod tcp;

pub use app::{App, AppError, Running};
pub use weft_transport::{Binder, OsBinder};
