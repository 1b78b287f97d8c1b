//! Fuzzes `jwt::JwtVerifier::verify` with the test key set: no input can be accepted,
//! because no input carries a valid signature for a token that also has the right
//! issuer, audience, lifetime and role (the private keys never reach the fuzzer), and
//! no input may panic.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use graph_session_proxy::Clock;
use graph_session_proxy::{JwtOptions, JwtVerifier};
use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;

/// Same issuer and audience as tests/jwt.rs.
const ISSUER: &str = "https://login.microsoftonline.com/5466a424-aadf-425c-9b24-034ca28d4bdd/v2.0";
const AUDIENCE: &str = "api://graph-session-proxy";

struct Harness {
    rt: Runtime,
    verifier: JwtVerifier,
    /// `JWT_FUZZ_DEBUG=1`: print why each input was refused (for checking the corpus).
    debug: bool,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let verifier = {
            let _inside = rt.enter();
            JwtVerifier::with_key_set(
                reqwest::Client::new(),
                JwtOptions {
                    issuer: ISSUER.into(),
                    audience: AUDIENCE.into(),
                    // Nothing listens there: an unknown kid's refetch (at most once per
                    // 30 s) fails fast and the fixture keys stay in use.
                    jwks_url: "http://127.0.0.1:9/keys".into(),
                    required_roles: vec!["Sessions.Read".into()],
                    leeway: Duration::from_secs(60),
                    max_age: Duration::from_secs(86400),
                },
                include_str!("../../tests/fixtures/jwks.json"),
                Clock::new(),
            )
            .expect("fixture key set parses")
        };
        let debug = std::env::var_os("JWT_FUZZ_DEBUG").is_some();
        Harness { rt, verifier, debug }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let h = harness();
    match h.rt.block_on(h.verifier.verify(token)) {
        Ok(claims) => {
            panic!("token accepted without a valid signature: {token:?} -> {claims:?}")
        }
        Err(e) if h.debug => eprintln!("refused: {e:?}"),
        Err(_) => {}
    }
});
