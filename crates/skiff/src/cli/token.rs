//! `skiff token create|ls|revoke`.

use super::parse_ttl;
use crate::client::Client;
use crate::output::{self, Format};
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token (printed once; the hub keeps only its hash).
    Create {
        /// How long it is valid, e.g. 24h or 30m (default: 24h for a join token; an API
        /// token until revoked).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// How many nodes may join with it (default: any until it expires; 1 with --replace).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
        /// The existing node a join with this token replaces (its old certificate is
        /// revoked): a stolen or re-imaged device.
        #[arg(long)]
        replace: Option<String>,
        /// join (a node), or an API token: admin (everything), read (every read, no
        /// change), metrics (/metrics and /api/v1/metrics only).
        #[arg(long, default_value = "join", value_parser = ["join", "admin", "read", "metrics"])]
        role: String,
    },
    /// List tokens (without their secrets).
    Ls,
    /// Stop a token from being used (nodes that joined with it stay).
    Revoke {
        /// The token's id (`skiff token ls`).
        id: String,
    },
}

pub(super) async fn token(c: &Client, cmd: &TokenCmd) -> Result<i32> {
    match cmd {
        TokenCmd::Create { ttl, uses, replace, role } => {
            let body = serde_json::json!({ "ttl_seconds": ttl, "uses": uses, "replace": replace, "role": role });
            let t: skiff_hub::tokens::CreatedToken = c.post("/api/v1/tokens", &body).await?;
            outln!("{}", t.token);
            let until = t.expires_ms.map(|e| format!("until {}", output::time_of(e))).unwrap_or("until revoked".into());
            if t.role == skiff_hub::store::TokenRole::Join {
                eprintln!(
                    "join token {} created, valid {until}; on the node, put the line above in a file and run: \
                     skiff agent --hub URL --token-file FILE",
                    t.id
                );
            } else {
                eprintln!("{} token {} created, valid {until}; send it as `Authorization: Bearer <token>`", role, t.id);
            }
        }
        TokenCmd::Ls => {
            let v: Vec<skiff_hub::store::TokenRecord> = c.get("/api/v1/tokens").await?;
            output::print(&v, Format::Table, &["ID", "ROLE", "EXPIRES", "USES", "REPLACES", "REVOKED"], |t| {
                let exp = t.expires_ms.map(output::time_of).unwrap_or_else(|| "never".into());
                let uses = match t.max_uses {
                    Some(m) => format!("{}/{m}", t.used),
                    None => t.used.to_string(),
                };
                let replace = t.replace.clone().unwrap_or_else(|| "-".into());
                vec![t.id.clone(), t.role.as_str().into(), exp, uses, replace, t.revoked.to_string()]
            })?;
        }
        TokenCmd::Revoke { id } => {
            c.delete(&format!("/api/v1/tokens/{id}")).await?;
            outln!("token {id} revoked");
        }
    }
    Ok(0)
}
