//! Admin commands that talk to Redis directly (with the gateway's configuration):
//! `customer add`, `token issue|revoke`, `device assign|unassign`. Every change is audited
//! as actor `admin`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::audit;
use crate::config::{Config, MAX_TTL_S};
use crate::pseudonym::{Imei, KeyRing};
use crate::registry::{Customer, Registry, parse_weekday};

/// The configuration to find Redis and the key file.
#[derive(Debug, Args)]
pub struct ConfigArg {
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
}

/// `trackgate customer …`
#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Register a customer.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        /// IANA time zone, e.g. Europe/Berlin.
        #[arg(long)]
        tz: String,
        /// Weekend days, comma-separated (default sat,sun).
        #[arg(long, default_value = "sat,sun")]
        weekend: String,
        /// Holidays, comma-separated dates (YYYY-MM-DD).
        #[arg(long, default_value = "")]
        holidays: String,
        /// Retention agreed with this customer, seconds.
        #[arg(long)]
        retention_s: Option<u64>,
    },
}

/// `trackgate token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue an API token (printed once; only its hash is stored).
    Issue {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        customer: String,
    },
    /// Revoke a token by its id.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        customer: String,
        #[arg(long)]
        id: String,
    },
}

/// `trackgate device …`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Make a customer the owner of a device.
    Assign {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        imei: String,
        #[arg(long)]
        customer: String,
    },
    /// Remove a device's owner.
    Unassign {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        imei: String,
    },
}

type Ctx = (
    Registry<crate::redis_conn::RedisConn>,
    crate::redis_conn::RedisConn,
    Config,
);

async fn context(config: &ConfigArg) -> Result<Ctx, String> {
    let config = Config::load(&config.config).map_err(|e| e.to_string())?;
    let conn = crate::redis_conn::connect(&config.redis).map_err(|e| e.to_string())?;
    Ok((Registry::new(conn.clone(), MAX_TTL_S), conn, config))
}

async fn audit_admin(
    conn: &mut crate::redis_conn::RedisConn,
    action: &str,
    devices: &str,
    detail: &str,
) -> Result<(), String> {
    audit::admin(conn, action, devices, detail)
        .await
        .map_err(|e| format!("audit: {e}"))
}

fn block_on<F: std::future::Future<Output = Result<(), String>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trackgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trackgate: {e}");
            ExitCode::from(2)
        }
    }
}

pub(super) fn customer(cmd: &CustomerCommand) -> ExitCode {
    let CustomerCommand::Add {
        config,
        id,
        name,
        tz,
        weekend,
        holidays,
        retention_s,
    } = cmd;
    block_on(async {
        let (reg, mut conn, _) = context(config).await?;
        let mut c = Customer::new(id, name, tz);
        c.weekend = weekend
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|d| parse_weekday(d).ok_or(format!("not a weekday: {d}")))
            .collect::<Result<_, _>>()?;
        c.holidays = holidays
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|d| d.trim().parse().map_err(|e| format!("holiday {d}: {e}")))
            .collect::<Result<_, _>>()?;
        c.retention_s = *retention_s;
        reg.add_customer(&c).await.map_err(|e| e.to_string())?;
        audit_admin(&mut conn, "customer.add", "", &format!("customer {id}")).await?;
        println!("customer {id} added");
        Ok(())
    })
}

pub(super) fn token(cmd: &TokenCommand) -> ExitCode {
    block_on(async {
        match cmd {
            TokenCommand::Issue { config, customer } => {
                let (reg, mut conn, _) = context(config).await?;
                let (tid, token) = reg.issue_token(customer).await.map_err(|e| e.to_string())?;
                audit_admin(
                    &mut conn,
                    "token.issue",
                    "",
                    &format!("customer {customer} token {tid}"),
                )
                .await?;
                println!("token id {tid} (store the token now; it is not shown again):\n{token}");
            }
            TokenCommand::Revoke {
                config,
                customer,
                id,
            } => {
                let (reg, mut conn, _) = context(config).await?;
                if !reg
                    .revoke_token(customer, id)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    return Err(format!("no token {id} for customer {customer}"));
                }
                audit_admin(
                    &mut conn,
                    "token.revoke",
                    "",
                    &format!("customer {customer} token {id}"),
                )
                .await?;
                println!("token {id} revoked");
            }
        }
        Ok(())
    })
}

pub(super) fn device(cmd: &DeviceCommand) -> ExitCode {
    block_on(async {
        let (config, imei) = match cmd {
            DeviceCommand::Assign { config, imei, .. }
            | DeviceCommand::Unassign { config, imei } => (config, imei),
        };
        let (reg, mut conn, cfg) = context(config).await?;
        let keys = KeyRing::load(&cfg.keys.key_file).map_err(|e| e.to_string())?;
        let imei = Imei::new(imei).ok_or("imei must be 14-15 digits")?;
        let devices: Vec<String> = keys
            .all_pseudonyms(&imei)
            .iter()
            .map(|p| p.to_string())
            .collect();
        match cmd {
            DeviceCommand::Assign { customer, .. } => {
                reg.assign(&imei, customer, &keys)
                    .await
                    .map_err(|e| e.to_string())?;
                audit_admin(
                    &mut conn,
                    "device.assign",
                    &devices.join(","),
                    &format!("to customer {customer}"),
                )
                .await?;
                println!(
                    "device {} assigned to {customer}",
                    devices.last().map(String::as_str).unwrap_or("")
                );
            }
            DeviceCommand::Unassign { .. } => {
                reg.unassign(&imei, &keys)
                    .await
                    .map_err(|e| e.to_string())?;
                audit_admin(&mut conn, "device.unassign", &devices.join(","), "").await?;
                println!(
                    "device {} unassigned",
                    devices.last().map(String::as_str).unwrap_or("")
                );
            }
        }
        Ok(())
    })
}
