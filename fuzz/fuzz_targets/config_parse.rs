//! Arbitrary text through the config parser and validator: no panic, and a config that
//! parses survives a serialize/parse round trip unchanged (so `config example` output and
//! what the gateway reads can never drift apart).
#![no_main]

use libfuzzer_sys::fuzz_target;
use trackgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    let _ = config.validate();
    let mut env_applied = config.clone();
    env_applied.apply_env(|_| None);
    let Ok(rendered) = toml::to_string(&config) else {
        return; // not every parsed value need render (e.g. non-finite numbers)
    };
    let again = Config::parse(&rendered).expect("a rendered config parses");
    assert_eq!(
        toml::to_string(&again).ok().as_deref(),
        Some(rendered.as_str()),
        "round trip changed the config"
    );
});
