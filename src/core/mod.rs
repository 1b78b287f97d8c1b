//! What every layer shares and that needs nothing of theirs: the model of what is
//! cached, the clock, small HTTP helpers, the single flight and remembered values.

pub mod clock;
pub(crate) mod flight;
pub mod http;
pub mod model;
pub(crate) mod remembered;
pub mod request_id;
