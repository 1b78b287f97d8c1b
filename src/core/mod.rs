//! What every layer shares and that needs nothing of theirs: the model of what is
//! cached, the clock, and small HTTP helpers.

pub mod clock;
pub(crate) mod flight;
pub mod http;
pub mod model;
pub mod request_id;
