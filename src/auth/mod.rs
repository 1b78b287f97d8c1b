//! Who is calling: API keys and Entra ID (JWT) caller tokens, and what each caller may read.

pub mod callers;
pub mod error;
pub mod jwt;
