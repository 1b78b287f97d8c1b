//! Everything that talks to Microsoft: the token provider (client credentials), the Graph
//! client (URLs, retries, list paging), the gate that stops Graph calls while Graph
//! throttles or fails, and bounded reads of what they answer.

pub mod bounded;
pub mod error;
pub mod gate;
pub mod graph;
pub mod list;
pub mod subscriptions;
pub mod token;
