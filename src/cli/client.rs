//! `trackgate purge …` and `trackgate export …`: clients of the customer API.
//!
//! The token comes from `TRACKGATE_TOKEN` (or `--token`, which leaves it in shell
//! history). Exit status: 0 done, 1 accepted but not completed yet (purge pending),
//! 2 refused or failed (the problem's code and detail on stderr).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// Where the API is and who is calling.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Base URL of the API, e.g. https://gateway.example:9464
    #[arg(long, env = "TRACKGATE_API")]
    pub api: String,
    /// Bearer token (prefer the environment variable).
    #[arg(long, env = "TRACKGATE_TOKEN", hide_env_values = true)]
    pub token: String,
}

/// `trackgate purge`
#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The device to purge.
    #[arg(long, required_unless_present = "status")]
    pub imei: Option<String>,
    /// Only fixes taken from this time (RFC 3339), with --to.
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// Makes a retried request return the first one's receipt.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Show the receipt of an earlier purge instead.
    #[arg(long, conflicts_with_all = ["imei", "from", "to"])]
    pub status: Option<String>,
}

/// `trackgate export`
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[arg(long)]
    pub imei: String,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub to: Option<String>,
    /// ndjson, csv or geojson.
    #[arg(long, default_value = "ndjson")]
    pub format: String,
    /// Write to this file instead of stdout.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn url(api: &ApiArgs, path: &str) -> String {
    format!("{}{path}", api.api.trim_end_matches('/'))
}

fn fail_with_body(status: u16, body: &str) -> ExitCode {
    eprintln!("trackgate: HTTP {status}: {}", body.trim());
    ExitCode::from(2)
}

pub(super) fn purge(args: &PurgeArgs) -> ExitCode {
    let auth = format!("Bearer {}", args.api.token);
    let response = if let Some(id) = &args.status {
        agent()
            .get(&url(&args.api, &format!("/v1/purges/{id}")))
            .header("Authorization", &auth)
            .call()
    } else {
        let mut body = serde_json::json!({ "imei": args.imei });
        if let (Some(f), Some(t)) = (&args.from, &args.to) {
            body["from"] = f.clone().into();
            body["to"] = t.clone().into();
        }
        let mut req = agent()
            .post(&url(&args.api, "/v1/purges"))
            .header("Authorization", &auth)
            .header("Content-Type", "application/json");
        if let Some(k) = &args.idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        req.send(body.to_string())
    };
    match response {
        Ok(mut r) => {
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            match status {
                200 => {
                    println!("{}", text.trim());
                    ExitCode::SUCCESS
                }
                202 => {
                    println!("{}", text.trim());
                    ExitCode::from(1)
                }
                _ => fail_with_body(status, &text),
            }
        }
        Err(e) => {
            eprintln!("trackgate: {e}");
            ExitCode::from(2)
        }
    }
}

pub(super) fn export(args: &ExportArgs) -> ExitCode {
    let mut body = serde_json::json!({ "imei": args.imei, "format": args.format });
    for (k, v) in [("from", &args.from), ("to", &args.to)] {
        if let Some(v) = v {
            body[k] = v.clone().into();
        }
    }
    let response = agent()
        .post(&url(&args.api, "/v1/exports"))
        .header("Authorization", &format!("Bearer {}", args.api.token))
        .header("Content-Type", "application/json")
        .send(body.to_string());
    let mut r = match response {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trackgate: {e}");
            return ExitCode::from(2);
        }
    };
    let status = r.status().as_u16();
    if status != 200 {
        let text = r.body_mut().read_to_string().unwrap_or_default();
        return fail_with_body(status, &text);
    }
    let mut reader = r.body_mut().as_reader();
    let result = match &args.out {
        Some(p) => std::fs::File::create(p)
            .and_then(|mut f| std::io::copy(&mut reader, &mut f).and_then(|_| f.flush())),
        None => std::io::copy(&mut reader, &mut std::io::stdout().lock()).map(|_| ()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trackgate: {e}");
            ExitCode::from(2)
        }
    }
}
