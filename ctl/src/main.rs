//! `dbvmctl`: the reference control-plane command line for dbvm: creates keys and
//! certificates, signs and sends commands through the broker, lists agents, follows events.
//!
//! Thin on purpose: parsing, printing and exit codes live here, everything else in the
//! `dbvmctl` library.

use anyhow::{Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand};
use dbvm_protocol::api::{CommandState, CommandView};
use dbvm_protocol::seal::SealingKey;
use dbvm_protocol::AgentId;
use dbvmctl::client::DEFAULT_BROKER_URL;
use dbvmctl::health::HealthError;
use dbvmctl::{output, CaInitOptions, Client, ClientError, Home, SendError, Sender};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use uuid::Uuid;

const AFTER_HELP: &str = "\
Exit codes:
  0  success (send, status: the command succeeded; health, fleet: the report was read,
     whatever its statuses)
  1  the command failed, was rejected, interrupted or expired, or did not finish in time
     (also the `health` command of health --fresh)
  2  usage or local configuration error (flags, home directory, keys, certificates)
  3  broker, API or connection error";

/// The exit codes, mapped in one place: see [`AFTER_HELP`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Success = 0,
    CommandFailed = 1,
    Usage = 2,
    Broker = 3,
}

#[derive(Parser)]
#[command(
    name = "dbvmctl",
    version,
    about = "Reference control plane for dbvm: keys, certificates, signed commands to agents through the broker",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Directory with the keys and certificates [default: $HOME/.dbvm]
    #[arg(long, env = "DBVM_HOME", global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Broker API address
    #[arg(long, env = "DBVM_BROKER", global = true, value_name = "URL", default_value = DEFAULT_BROKER_URL)]
    broker: String,
    /// Print what happens while waiting, also when stderr is not a terminal
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the signing (ed25519) and sealing (X25519) key pairs; print the
    /// [[trusted_keys]] entry agents need
    Keygen {
        /// Replace existing keys (agents must then trust the new one)
        #[arg(long)]
        force: bool,
    },
    /// Fleet CA and certificates
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Ask the broker for a one-time enrollment token for an agent; prints the token alone
    EnrollToken {
        agent: AgentId,
        /// Token lifetime in seconds [default: the broker's, 900]
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Print the whole answer as JSON
        #[arg(long)]
        json: bool,
    },
    /// List the agents the broker knows (`agents revoke` revokes one's certificates)
    #[command(args_conflicts_with_subcommands = true)]
    Agents {
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<AgentsCommand>,
    },
    /// Sign a command, send it to an agent and wait for its result
    Send(SendArgs),
    /// Show a command the broker knows, optionally waiting for it to finish
    ///
    /// Exit code 0 when it succeeded or (without --wait) is still under way.
    Status {
        command_id: Uuid,
        /// Wait up to this many seconds for the command to finish
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait: u64,
        #[command(flatten)]
        show: ShowArgs,
    },
    /// Show an agent's latest health report: one row per check
    ///
    /// Reads the report the broker keeps (the agent sends one when it connects, when a
    /// status changes and about every minute); --fresh runs the checks now instead.
    /// Statuses are coloured when stdout is a terminal and NO_COLOR is not set.
    /// Exit code 0 whenever a report was read, whatever its statuses.
    Health {
        agent: AgentId,
        /// Print the report as JSON (the broker's `GET /v1/agents/{id}/health` answer)
        #[arg(long)]
        json: bool,
        /// Run the checks now: send the agent a signed `health` command and wait for it
        #[arg(long)]
        fresh: bool,
        /// Also show since when each check is in its status, and its figures (also
        /// with --verbose)
        #[arg(short, long)]
        wide: bool,
        /// With --fresh: how long to wait for the agent's answer, in seconds
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
    },
    /// Show the health of every agent the broker knows: worst status and problems
    ///
    /// Exit code 0 whenever the summary was read, whatever it says.
    Fleet {
        /// Print the summary as JSON (the broker's `GET /v1/health` answer)
        #[arg(long)]
        json: bool,
    },
    /// Back up an agent's database now (the first backup of a chain is full, later ones
    /// incremental), or `backup configure` / `backup verify`
    ///
    /// Progress shows while it runs; exit code 0 when the backup succeeded.
    #[command(args_conflicts_with_subcommands = true)]
    Backup {
        agent: Option<AgentId>,
        /// auto: full for a new chain, incremental otherwise
        #[arg(long = "type", value_name = "KIND", value_parser = ["auto", "full", "incr"], default_value = "auto")]
        kind: String,
        #[command(flatten)]
        wait: OpWait,
        #[command(subcommand)]
        command: Option<BackupCommand>,
    },
    /// List an agent's backups: chains, sizes, and the window a restore can reach
    Backups {
        agent: AgentId,
        /// Print the agent's answer (`backup.list`) as JSON
        #[arg(long)]
        json: bool,
        /// How long to wait for the answer, in seconds
        #[arg(long, value_name = "SECONDS", default_value_t = 120)]
        timeout: u64,
    },
    /// Build a new database on an agent from another database's backups, up to a point
    /// in time (restore always makes a new database; `recover` works in place)
    Restore {
        agent: AgentId,
        /// The source's storage; --prefix names the source database's folder (its
        /// agent's id)
        #[command(flatten)]
        storage: StorageFlags,
        /// Engine of the new database
        #[arg(long, value_parser = ["postgres", "mariadb", "mysql8"], default_value = "postgres")]
        engine: String,
        /// Name of the application database
        #[arg(long, default_value = "app")]
        database: String,
        /// The new database's port [default: the engine's]
        #[arg(long)]
        port: Option<u16>,
        /// `latest`, or an RFC 3339 time such as 2026-12-03T18:00:00Z
        #[arg(long, default_value = "latest")]
        target: String,
        #[command(flatten)]
        wait: OpWait,
    },
    /// Recover an agent's database in place from its own backups, to `latest` or a time
    Recover {
        agent: AgentId,
        /// `latest`, or an RFC 3339 time such as 2026-12-03T18:00:00Z
        #[arg(long)]
        target: String,
        #[command(flatten)]
        wait: OpWait,
    },
    /// Upload a new agent binary to the broker and upgrade agents to it, in waves
    ///
    /// The binary is hashed and uploaded (skipped when the broker has it); then each
    /// agent of a wave gets a signed agent.upgrade and the whole wave is awaited. The
    /// agent downloads the binary from the broker, runs it on trial, swaps and restarts;
    /// a new agent that does not connect in time is rolled back. The first failure stops
    /// the rollout: later waves are not started. Exit code 0 when every agent upgraded,
    /// 1 when one did not.
    Upgrade(UpgradeArgs),
    /// Collect a log bundle from an agent, download it and check it, or `bundle list` /
    /// `bundle fetch ID` / `bundle delete ID`
    ///
    /// The agent gathers its logs, configs (redacted), the database's logs and settings,
    /// health history, backup state, firewall, container and system facts into one
    /// tar.zst with a manifest, and uploads it to the broker while it is written; then
    /// the bundle is downloaded to FILE and its SHA-256 checked against what the agent
    /// and the broker say. Exit code 0 when the bundle arrived whole.
    #[command(args_conflicts_with_subcommands = true)]
    Bundle {
        agent: Option<AgentId>,
        /// Where the bundle goes [default: bundle-<agent>-<id>.tar.zst here]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Logs of the last this many hours [agent's default: 24]
        #[arg(long, value_name = "HOURS")]
        hours: Option<u32>,
        /// Leave out the database's server and tool logs
        #[arg(long)]
        no_db_logs: bool,
        /// Include the database's diagnostic views (settings, activity)
        #[arg(long)]
        db_views: bool,
        /// Cap on the bundle's files before compression, in bytes [agent's default:
        /// 512 MiB]; the newest log lines are kept, the manifest names what was cut
        #[arg(long, value_name = "BYTES")]
        max_bytes: Option<u64>,
        /// The broker's API as the agent reaches it [default: --broker]
        #[arg(long, value_name = "URL")]
        broker_url: Option<String>,
        /// How long to wait for the agent, in seconds
        #[arg(long, value_name = "SECONDS", default_value_t = 1800)]
        timeout: u64,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<BundleCommand>,
    },
    /// List the commands the broker knows, newest first: one line each
    ///
    /// Filters combine. One page at a time: the last line says how to ask for the next
    /// (--cursor), or --all pages through them all.
    Commands {
        /// Only this agent's commands
        #[arg(long, value_name = "ID")]
        agent: Option<AgentId>,
        /// Only in these states (comma-separated: queued, delivered, running, succeeded,
        /// failed, rejected, interrupted, expired, cancelled)
        #[arg(long, value_name = "STATES")]
        state: Option<String>,
        /// Only this operation (db.create, bundle.collect, ...)
        #[arg(long, value_name = "NAME")]
        operation: Option<String>,
        /// Only those submitted in the last this many minutes
        #[arg(long, value_name = "MINUTES")]
        since_minutes: Option<u64>,
        /// Commands per page (1 to 1000)
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Where the previous page ended (its last line gives it)
        #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
        cursor: Option<String>,
        /// Every page, not one
        #[arg(long)]
        all: bool,
        /// The page as the broker answers it (with --all: one JSON array)
        #[arg(long)]
        json: bool,
    },
    /// Take back a command that has not reached its agent yet
    ///
    /// Exit code 0 when it was cancelled; 1, with its state, when it had already reached
    /// the agent or finished (then it runs or ran: `status` follows it).
    Cancel {
        command_id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Follow the broker's events, one line each
    ///
    /// Each event has an id (`--json` shows it as `seq`). Give the last one you saw to
    /// --after to go on from there without losing one; the broker says so (a `dropped`
    /// line) if it no longer keeps them all. A dropped connection is resumed the same way.
    Events {
        /// Only this agent's events
        #[arg(long, value_name = "ID")]
        agent: Option<AgentId>,
        /// Start with the events after this id
        #[arg(long, value_name = "ID")]
        after: Option<u64>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Revoke every certificate issued to an agent so far (a stolen one, say): the broker
    /// refuses them at handshake and renewal and closes the agent's session
    ///
    /// The agent id stays usable: give the VM a new enrollment token (`dbvmctl
    /// enroll-token`) and it gets a fresh certificate.
    Revoke {
        agent: AgentId,
        /// Why, for the record (at most 256 characters)
        #[arg(long)]
        reason: Option<String>,
        /// Print the broker's answer as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BundleCommand {
    /// List the bundles the broker holds, newest first
    List {
        /// Print the broker's answer as JSON
        #[arg(long)]
        json: bool,
    },
    /// Download a bundle the broker holds and check its SHA-256
    Fetch {
        id: Uuid,
        /// Where it goes [default: bundle-<agent>-<id>.tar.zst here]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete a bundle from the broker
    Delete { id: Uuid },
    /// The broker's own bundle: its version, config (redacted), logs, store statistics,
    /// the agents it knows and its metrics; made now, downloaded and checked
    Broker {
        /// Where it goes [default: bundle-broker-<id>.tar.zst here]
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The logs of the last this many hours
        #[arg(long, value_name = "HOURS", default_value_t = 24)]
        hours: u32,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Point an agent's backups at a bucket: checked with the keys before the working
    /// setup changes; turns on continuous archiving of the transaction logs
    Configure {
        agent: AgentId,
        #[command(flatten)]
        storage: StorageFlags,
        /// Days a chain takes new incrementals (chain expiry = creation + these days)
        #[arg(long, value_name = "DAYS", default_value_t = 7)]
        retention_days: u32,
        /// Hours between the backups the agent runs by itself (0: none)
        #[arg(long, value_name = "HOURS", default_value_t = 24)]
        schedule_hours: u32,
        #[command(flatten)]
        cloud: Box<CloudFlags>,
        #[command(flatten)]
        wait: OpWait,
    },
    /// Purge now what the daily purger would: chains whose last backup has expired
    /// (never the newest)
    Purge {
        agent: AgentId,
        #[command(flatten)]
        wait: OpWait,
    },
    /// Restore drill: restore a backup into a throwaway database on the VM and check it
    Verify {
        agent: AgentId,
        /// The backup to check (a label from `dbvmctl backups`) [default: the newest]
        #[arg(long, value_name = "LABEL")]
        backup_set: Option<String>,
        #[command(flatten)]
        wait: OpWait,
    },
}

/// Where backups are (an S3 bucket over TLS) and the keys to it, read from files so that
/// they are never in a process's arguments; they are sealed to the agent.
#[derive(Args)]
struct StorageFlags {
    /// S3 endpoint, https://host:port (TLS is required)
    #[arg(long, value_name = "URL")]
    endpoint: String,
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Folder in the bucket [backup: default the agent's id; restore: the source's]
    #[arg(long)]
    prefix: Option<String>,
    /// CA certificate (PEM) that signed the endpoint's certificate
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// File holding the access key id
    #[arg(long, value_name = "PATH")]
    access_key_file: PathBuf,
    /// File holding the secret access key
    #[arg(long, value_name = "PATH")]
    secret_key_file: PathBuf,
}

/// Arguments and the secrets to seal into them.
type SealedArgs = (
    serde_json::Value,
    Vec<(String, dbvm_protocol::seal::Secret)>,
);

/// The cloud bucket: a copy of the backups for disaster recovery, with its own retention.
/// Without `--cloud-endpoint`, the agent keeps no cloud copy (a configured one stops).
#[derive(Args)]
struct CloudFlags {
    /// Cloud bucket's S3 endpoint, https://host:port
    #[arg(long, value_name = "URL", requires_all = ["cloud_bucket", "cloud_access_key_file", "cloud_secret_key_file"])]
    cloud_endpoint: Option<String>,
    #[arg(long, value_name = "BUCKET")]
    cloud_bucket: Option<String>,
    #[arg(long, value_name = "REGION", default_value = "us-east-1")]
    cloud_region: String,
    /// Folder in the cloud bucket [default: the agent's id]
    #[arg(long, value_name = "PREFIX")]
    cloud_prefix: Option<String>,
    /// CA certificate (PEM) that signed the cloud endpoint's certificate
    #[arg(long, value_name = "PATH")]
    cloud_ca_file: Option<PathBuf>,
    /// File holding the cloud's access key id
    #[arg(long, value_name = "PATH")]
    cloud_access_key_file: Option<PathBuf>,
    /// File holding the cloud's secret access key
    #[arg(long, value_name = "PATH")]
    cloud_secret_key_file: Option<PathBuf>,
    /// The cloud's own retention in days
    #[arg(long, value_name = "DAYS", default_value_t = 30)]
    cloud_retention_days: u32,
    /// PostgreSQL: a backup goes to the cloud after a local one when the cloud's newest is
    /// at least this old (0: after every backup)
    #[arg(long, value_name = "HOURS", default_value_t = 24)]
    cloud_backup_every_hours: u32,
}

impl CloudFlags {
    /// The `cloud` argument and its keys (named `cloud.access_key_id`, …), if asked for.
    fn build(&self) -> Result<Option<SealedArgs>> {
        let Some(endpoint) = &self.cloud_endpoint else {
            return Ok(None);
        };
        let (location, keys) = dbvmctl::backup::StorageArgs {
            endpoint: endpoint.clone(),
            bucket: self.cloud_bucket.clone().unwrap_or_default(),
            region: self.cloud_region.clone(),
            prefix: self.cloud_prefix.clone(),
            ca_file: self.cloud_ca_file.clone(),
            access_key_file: self.cloud_access_key_file.clone().unwrap_or_default(),
            secret_key_file: self.cloud_secret_key_file.clone().unwrap_or_default(),
        }
        .build()?;
        let keys = keys
            .into_iter()
            .map(|(name, secret)| (format!("cloud.{name}"), secret))
            .collect();
        Ok(Some((
            serde_json::json!({
                "storage": location,
                "retention_days": self.cloud_retention_days,
                "backup_every_hours": self.cloud_backup_every_hours,
            }),
            keys,
        )))
    }
}

impl StorageFlags {
    fn build(
        &self,
    ) -> Result<(
        serde_json::Value,
        Vec<(String, dbvm_protocol::seal::Secret)>,
    )> {
        Ok(dbvmctl::backup::StorageArgs {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            region: self.region.clone(),
            prefix: self.prefix.clone(),
            ca_file: self.ca_file.clone(),
            access_key_file: self.access_key_file.clone(),
            secret_key_file: self.secret_key_file.clone(),
        }
        .build()?)
    }
}

/// Waiting for a backup command, and how to print it.
#[derive(Args)]
struct OpWait {
    /// How long to wait for the result, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 21600)]
    timeout: u64,
    /// Return once the broker has accepted the command
    #[arg(long)]
    no_wait: bool,
    /// Print the command as the broker's JSON
    #[arg(long)]
    json: bool,
    /// Open sealed values in the output with this home's sealing key (prints secrets,
    /// such as a restored database's password)
    #[arg(long)]
    reveal: bool,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the fleet CA, the broker's server certificate and dbvmctl's client certificate
    Init {
        /// DNS names and IP addresses of the broker (repeat, or separate with commas)
        /// [default: localhost, 127.0.0.1]
        #[arg(long = "broker-name", value_name = "NAME", num_args = 1.., value_delimiter = ',', action = ArgAction::Append)]
        broker_names: Vec<String>,
        /// Name of this control plane in its certificate
        #[arg(long, value_name = "NAME", default_value = "ops")]
        control_plane: String,
        /// Lifetime of the CA and the certificates, in days
        #[arg(long, value_name = "DAYS", default_value_t = 3650)]
        ca_days: u32,
        /// Replace an existing CA (the broker and agents then need new certificates)
        #[arg(long)]
        force: bool,
    },
    /// Issue another control-plane certificate from this home's fleet CA, with the roles
    /// it may use: operator (submit, cancel, enroll, revoke, artifacts), reader (lists,
    /// health, events), support (log bundles); reading takes any role
    Issue {
        /// The control plane's name in the certificate (a-z, 0-9, '-', '.')
        name: String,
        /// A role (repeat, or separate with commas): operator, reader, support
        #[arg(long = "role", value_name = "ROLE", required = true, num_args = 1.., value_delimiter = ',', action = ArgAction::Append, value_parser = parse_role)]
        roles: Vec<dbvm_protocol::pki::Role>,
        /// Lifetime in days
        #[arg(long, value_name = "DAYS", default_value_t = 365)]
        days: u32,
        /// Directory for NAME.crt and NAME.key (0600); existing files are never replaced
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Print what was made as JSON
        #[arg(long)]
        json: bool,
    },
}

fn parse_role(text: &str) -> Result<dbvm_protocol::pki::Role, String> {
    dbvm_protocol::pki::Role::parse(text)
        .ok_or_else(|| format!("{text:?} is not a role: operator, reader or support"))
}

#[derive(Args)]
struct ShowArgs {
    /// Print the command as the broker's JSON
    #[arg(long)]
    json: bool,
    /// Open sealed values in the output with this home's sealing key (prints secrets)
    #[arg(long)]
    reveal: bool,
}

#[derive(Args)]
struct SendArgs {
    agent: AgentId,
    /// Operation name, for example ping or facts
    operation: String,
    /// Arguments as key=value; a value that is valid JSON (5432, true, {"a":1}, "quoted")
    /// is taken as JSON, anything else as a string
    #[arg(value_name = "KEY=VALUE")]
    args: Vec<String>,
    /// A secret argument, sealed to the agent's key before it leaves this machine
    /// (repeatable)
    #[arg(long = "secret", value_name = "NAME=VALUE")]
    secrets: Vec<String>,
    /// A secret argument read from a file (one trailing newline dropped), so that it is
    /// never in a process's arguments (repeatable)
    #[arg(long = "secret-file", value_name = "NAME=PATH")]
    secret_files: Vec<String>,
    /// How long the command stays valid, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    ttl: u64,
    /// How long to wait for the result, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
    /// Return once the broker has accepted the command
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    show: ShowArgs,
}

#[derive(Args)]
struct UpgradeArgs {
    /// The new agent binary (dbvm-agent)
    #[arg(long, value_name = "PATH")]
    binary: PathBuf,
    /// What the new binary's --version prints, such as 0.1.1
    #[arg(long = "version", value_name = "VERSION")]
    agent_version: String,
    /// The SHA-256 the binary must have (a release's published hash): checked before
    /// anything is uploaded
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// How long a new agent has to connect before the old one rolls back, in seconds
    /// (10 to 600)
    #[arg(long, value_name = "SECONDS", default_value_t = dbvmctl::upgrade::DEFAULT_DEADLINE_S)]
    deadline_s: u32,
    /// Agents upgraded at once; the next wave starts when all of one upgraded
    #[arg(long, value_name = "N", default_value_t = 1)]
    wave_size: usize,
    /// Where agents download the binary [default: the broker address + /v1/artifacts/<sha256>];
    /// give it when agents reach the broker's API by another name
    #[arg(long, value_name = "URL")]
    artifact_url: Option<String>,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// The agents, in the order they are upgraded
    #[arg(required = true, value_name = "AGENT")]
    agents: Vec<AgentId>,
}

/// The broker ended the event stream (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("the broker at {0} closed the event stream: run `dbvmctl events` again once it is back")]
struct StreamClosed(String);

/// Reconnections of `dbvmctl events` in a row before it gives up.
const EVENTS_RESUME_TRIES: u32 = 10;

fn exit_code_of(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return if e.is_local() {
                Exit::Usage
            } else {
                Exit::Broker
            };
        }
        if let Some(e) = cause.downcast_ref::<SendError>() {
            return if e.is_local() {
                Exit::Usage
            } else {
                Exit::Broker
            };
        }
        if let Some(e) = cause.downcast_ref::<dbvmctl::UpgradeError>() {
            return if e.is_local() {
                Exit::Usage
            } else {
                Exit::Broker
            };
        }
        if cause.is::<StreamClosed>() {
            return Exit::Broker;
        }
        if let Some(e) = cause.downcast_ref::<HealthError>() {
            return match e {
                HealthError::Client(c) if c.is_local() => Exit::Usage,
                HealthError::Client(_) | HealthError::NotConnected(_) => Exit::Broker,
                HealthError::Sign(_) => Exit::Usage,
                HealthError::Unsupported { .. }
                | HealthError::NotFinished { .. }
                | HealthError::Failed { .. }
                | HealthError::BadOutput { .. } => Exit::CommandFailed,
            };
        }
    }
    Exit::Usage
}

fn main() -> ExitCode {
    // clap exits with 2 on usage errors and 0 for --help and --version.
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dbvmctl: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Usage as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(err) => {
            eprintln!("dbvmctl: {err:#}");
            ExitCode::from(exit_code_of(&err) as u8)
        }
    }
}

struct Ctx {
    dir: Option<PathBuf>,
    broker: String,
    verbose: bool,
}

impl Ctx {
    fn home(&self) -> Result<Home> {
        Ok(Home::resolve(self.dir.clone())?)
    }

    fn client(&self, home: &Home) -> Result<Client> {
        let tls = home.tls_client_config()?;
        Ok(Client::new(&self.broker, tls)?)
    }
}

async fn run(cli: Cli) -> Result<Exit> {
    let ctx = Ctx {
        dir: cli.dir,
        broker: cli.broker,
        verbose: cli.verbose,
    };
    match cli.command {
        Command::Keygen { force } => keygen(&ctx, force),
        Command::Ca {
            command:
                CaCommand::Init {
                    broker_names,
                    control_plane,
                    ca_days,
                    force,
                },
        } => {
            let options = CaInitOptions {
                broker_names,
                control_plane,
                ca_days,
                force,
            };
            ca_init(&ctx, &options)
        }
        Command::Ca {
            command:
                CaCommand::Issue {
                    name,
                    roles,
                    days,
                    out,
                    json,
                },
        } => {
            let home = ctx.home()?;
            let made = dbvmctl::ca_issue(&home, &name, &roles, days, &out)?;
            if json {
                out_json(&made)?;
            } else {
                self::out(&format!(
                    "control-plane certificate for {:?} with roles {}: {} (key {}), valid until {}\n",
                    made.control_plane,
                    made.roles.join(", "),
                    made.cert.display(),
                    made.key.display(),
                    output::format_time(made.not_after_ms)
                ))?;
            }
            Ok(Exit::Success)
        }
        Command::EnrollToken { agent, ttl, json } => enroll_token(&ctx, &agent, ttl, json).await,
        Command::Agents {
            json,
            command: None,
        } => agents(&ctx, json).await,
        Command::Agents {
            command:
                Some(AgentsCommand::Revoke {
                    agent,
                    reason,
                    json,
                }),
            ..
        } => revoke(&ctx, &agent, reason.as_deref(), json).await,
        Command::Send(args) => send(&ctx, args).await,
        Command::Status {
            command_id,
            wait,
            show,
        } => status(&ctx, command_id, wait, &show).await,
        Command::Health {
            agent,
            json,
            fresh,
            wide,
            timeout,
        } => {
            let wide = wide || ctx.verbose;
            health(
                &ctx,
                &agent,
                json,
                fresh,
                wide,
                Duration::from_secs(timeout),
            )
            .await
        }
        Command::Fleet { json } => fleet(&ctx, json).await,
        Command::Events { agent, after, json } => events(&ctx, agent.as_ref(), after, json).await,
        Command::Commands {
            agent,
            state,
            operation,
            since_minutes,
            limit,
            cursor,
            all,
            json,
        } => {
            let mut query: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            if let Some(a) = &agent {
                query.push(("agent", a.to_string()));
            }
            if let Some(s) = state {
                query.push(("state", s));
            }
            if let Some(o) = operation {
                query.push(("operation", o));
            }
            if let Some(m) = since_minutes {
                let since = dbvm_protocol::now_ms()
                    .saturating_sub(i64::try_from(m.saturating_mul(60_000)).unwrap_or(i64::MAX));
                query.push(("since_ms", since.max(0).to_string()));
            }
            commands(&ctx, query, cursor, all, json).await
        }
        Command::Cancel { command_id, json } => cancel(&ctx, command_id, json).await,
        Command::Upgrade(args) => upgrade(&ctx, args).await,
        Command::Bundle {
            command: Some(BundleCommand::List { json }),
            ..
        } => bundle_list(&ctx, json).await,
        Command::Bundle {
            command: Some(BundleCommand::Fetch { id, output, json }),
            ..
        } => bundle_fetch(&ctx, id, output, None, json).await,
        Command::Bundle {
            command: Some(BundleCommand::Delete { id }),
            ..
        } => {
            let home = ctx.home()?;
            ctx.client(&home)?.delete_bundle(id).await?;
            Ok(Exit::Success)
        }
        Command::Bundle {
            command:
                Some(BundleCommand::Broker {
                    output,
                    hours,
                    json,
                }),
            ..
        } => {
            let home = ctx.home()?;
            let client = ctx.client(&home)?;
            if let Some(out) = &output {
                if out.exists() {
                    return Err(dbvmctl::bundle::BundleError::Exists(out.clone()).into());
                }
            }
            let made = client.broker_bundle(hours).await?;
            let output =
                output.unwrap_or_else(|| dbvmctl::bundle::default_file(&made.agent_id, made.id));
            bundle_fetch(&ctx, made.id, Some(output), made.sha256, json).await
        }
        Command::Bundle {
            agent,
            output,
            hours,
            no_db_logs,
            db_views,
            max_bytes,
            broker_url,
            timeout,
            json,
            command: None,
        } => {
            let agent = agent.context(
                "name the agent: dbvmctl bundle <AGENT> (or bundle list / fetch ID / broker)",
            )?;
            let collect = dbvmctl::bundle::Collect {
                hours,
                include_db_logs: !no_db_logs,
                include_db_views: db_views,
                max_bytes,
                broker_url,
                ..dbvmctl::bundle::Collect::new(agent)
            };
            bundle(&ctx, collect, output, Duration::from_secs(timeout), json).await
        }
        Command::Backup {
            agent,
            kind,
            wait,
            command: None,
        } => {
            let agent = agent.context(
                "name the agent: dbvmctl backup <AGENT> (or backup configure / backup verify)",
            )?;
            let args = serde_json::json!({"type": kind});
            operation(&ctx, &agent, "backup.run", args, Vec::new(), &wait).await
        }
        Command::Backup {
            command:
                Some(BackupCommand::Configure {
                    agent,
                    storage,
                    retention_days,
                    schedule_hours,
                    cloud,
                    wait,
                }),
            ..
        } => {
            let (location, mut keys) = storage.build()?;
            let mut args = serde_json::json!({
                "storage": location,
                "retention_days": retention_days,
                "schedule_hours": schedule_hours,
            });
            if let Some((c, cloud_keys)) = cloud.build()? {
                args["cloud"] = c;
                keys.extend(cloud_keys);
            }
            operation(&ctx, &agent, "backup.configure", args, keys, &wait).await
        }
        Command::Backup {
            command: Some(BackupCommand::Purge { agent, wait }),
            ..
        } => {
            let args = serde_json::json!({});
            operation(&ctx, &agent, "backup.purge", args, Vec::new(), &wait).await
        }
        Command::Backup {
            command:
                Some(BackupCommand::Verify {
                    agent,
                    backup_set,
                    wait,
                }),
            ..
        } => {
            let args = match backup_set {
                Some(l) => serde_json::json!({"backup_set": l}),
                None => serde_json::json!({}),
            };
            operation(&ctx, &agent, "backup.verify", args, Vec::new(), &wait).await
        }
        Command::Backups {
            agent,
            json,
            timeout,
        } => backups(&ctx, &agent, json, Duration::from_secs(timeout)).await,
        Command::Restore {
            agent,
            storage,
            engine,
            database,
            port,
            target,
            wait,
        } => {
            if storage.prefix.is_none() {
                anyhow::bail!(
                    "--prefix: name the source database's folder in the bucket (its agent's id)"
                );
            }
            let (source, keys) = storage.build()?;
            let mut spec = serde_json::json!({"engine": engine, "database": database});
            if let Some(port) = port {
                spec["port"] = serde_json::json!(port);
            }
            let args = serde_json::json!({"spec": spec, "source": source, "target": target});
            operation(&ctx, &agent, "db.restore", args, keys, &wait).await
        }
        Command::Recover {
            agent,
            target,
            wait,
        } => {
            let args = serde_json::json!({"target": target});
            operation(&ctx, &agent, "db.recover", args, Vec::new(), &wait).await
        }
    }
}

/// Signs and sends one operation with its sealed secrets, waits with progress, prints it.
async fn operation(
    ctx: &Ctx,
    agent: &AgentId,
    name: &str,
    args: serde_json::Value,
    secrets: Vec<(String, dbvm_protocol::seal::Secret)>,
    wait: &OpWait,
) -> Result<Exit> {
    let serde_json::Value::Object(args) = args else {
        anyhow::bail!("the arguments of {name} are not an object");
    };
    let request = dbvmctl::send::Request {
        args,
        secrets,
        ..dbvmctl::send::Request::new(agent.clone(), name)
    };
    let show = ShowArgs {
        json: wait.json,
        reveal: wait.reveal,
    };
    submit_and_show(
        ctx,
        request,
        wait.no_wait,
        Duration::from_secs(wait.timeout),
        &show,
    )
    .await
}

/// `backup.list`, as a table or JSON.
async fn backups(ctx: &Ctx, agent: &AgentId, json: bool, timeout: Duration) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let signer = home.signer()?;
    let sender = Sender::new(&client, &signer, home.sealing_public_key()?);
    let view = sender
        .submit(dbvmctl::send::Request::new(agent.clone(), "backup.list"))
        .await?;
    let Some(view) = wait_for(ctx, &client, view, timeout).await? else {
        return Ok(Exit::CommandFailed);
    };
    match (&view.state, &view.output) {
        (CommandState::Succeeded, Some(output)) => {
            if json {
                out_json(output)?;
            } else {
                out(&dbvmctl::backup::backups_table(output))?;
            }
            Ok(Exit::Success)
        }
        _ => show_command(
            &view,
            &ShowArgs {
                json,
                reveal: false,
            },
            None,
            Some(timeout),
        ),
    }
}

/// `dbvmctl bundle AGENT`: collect (signed), wait, fetch, check, summarise.
async fn bundle(
    ctx: &Ctx,
    collect: dbvmctl::bundle::Collect,
    output: Option<PathBuf>,
    timeout: Duration,
    json: bool,
) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let signer = home.signer()?;
    let sender = Sender::new(&client, &signer, home.sealing_public_key()?);
    let request = collect.request(&client)?;
    if let Some(out) = &output {
        // Before the agent works for nothing.
        if out.exists() {
            return Err(dbvmctl::bundle::BundleError::Exists(out.clone()).into());
        }
    }
    let view = sender.submit(request).await?;
    if ctx.verbose {
        eprintln!(
            "submitted command {} (bundle.collect on {})",
            view.id, view.agent_id
        );
    }
    let Some(view) = wait_for(ctx, &client, view, timeout).await? else {
        return Ok(Exit::CommandFailed);
    };
    let sha256 = match (&view.state, &view.output) {
        (CommandState::Succeeded, Some(o)) => o["sha256"].as_str().map(str::to_string),
        _ => {
            let show = ShowArgs {
                json,
                reveal: false,
            };
            return show_command(&view, &show, None, Some(timeout));
        }
    };
    let output =
        output.unwrap_or_else(|| dbvmctl::bundle::default_file(collect.agent.as_str(), view.id));
    bundle_fetch(ctx, view.id, Some(output), sha256, json).await
}

/// Downloads bundle `id` with a progress bar, checks it, prints its manifest's summary.
async fn bundle_fetch(
    ctx: &Ctx,
    id: Uuid,
    output: Option<PathBuf>,
    expected: Option<String>,
    json: bool,
) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let output = match output {
        Some(o) => o,
        None => {
            let list = client.bundles().await?;
            let agent = list
                .bundles
                .iter()
                .find(|b| b.id == id)
                .map_or("agent", |b| b.agent_id.as_str());
            dbvmctl::bundle::default_file(agent, id)
        }
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} {elapsed:>4} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("downloading bundle {id}"));
        bar
    });
    let fetched = dbvmctl::bundle::fetch(&client, id, &output, expected.as_deref(), |n, total| {
        if let Some(bar) = &bar {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(n);
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let fetched = fetched?;
    let path = fetched.path.clone();
    // Every file against the manifest: a bundle damaged after the broker checked it (on
    // the broker's disk, on the way) is refused here.
    let manifest = tokio::task::spawn_blocking(move || dbvmctl::bundle::manifest(&path))
        .await
        .context("checking the bundle against its manifest")??;
    if json {
        let mut summary = manifest.clone();
        if let Some(files) = manifest["files"].as_array() {
            summary["files"] = files.len().into();
        }
        out_json(&serde_json::json!({
            "id": fetched.id,
            "path": fetched.path,
            "bytes": fetched.bytes,
            "sha256": fetched.sha256,
            "manifest": summary,
        }))?;
    } else {
        out(&format!(
            "{} ({} bytes, sha256 {} checked; every file matches the manifest)\n{}",
            fetched.path.display(),
            fetched.bytes,
            fetched.sha256,
            dbvmctl::bundle::summary(&manifest)
        ))?;
    }
    Ok(Exit::Success)
}

/// `dbvmctl bundle list`.
async fn bundle_list(ctx: &Ctx, json: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let list = ctx.client(&home)?.bundles().await?;
    if json {
        out_json(&list)?;
        return Ok(Exit::Success);
    }
    // An S3 column only when the broker copies bundles to a bucket.
    let copies = list.bundles.iter().any(|b| b.s3.is_some());
    let mut text = format!(
        "{:<36}  {:<16}  {:<9}  {:>12}  {}\n",
        "ID",
        "AGENT",
        "STATE",
        "BYTES",
        if copies {
            format!("{:<24}  S3", "CREATED")
        } else {
            "CREATED".to_string()
        }
    );
    for b in &list.bundles {
        let copy = match (&b.s3, copies) {
            (_, false) => String::new(),
            (None, true) => "  -".into(),
            (Some(c), true) => match &c.error {
                Some(e) => format!("  {} ({e})", c.state.as_str()),
                None => format!("  {}", c.state.as_str()),
            },
        };
        let created = output::format_time(b.created_at_ms);
        let created = if copies {
            format!("{created:<24}")
        } else {
            created
        };
        text.push_str(&format!(
            "{:<36}  {:<16}  {:<9}  {:>12}  {created}{copy}\n",
            b.id,
            b.agent_id,
            b.state.as_str(),
            b.size,
        ));
    }
    let n = list.bundles.len();
    text.push_str(&format!(
        "{n} bundle{}, {} bytes complete\n",
        if n == 1 { "" } else { "s" },
        list.total_bytes
    ));
    out(&text)?;
    Ok(Exit::Success)
}

/// Writes to stdout; `false` when the reader went away (`dbvmctl events | head`).
fn out(text: &str) -> Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("cannot write to stdout"),
    }
}

fn out_json(value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode the answer as JSON")?;
    out(&format!("{text}\n"))?;
    Ok(())
}

fn keygen(ctx: &Ctx, force: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let made = dbvmctl::keygen(&home, force)?;
    eprintln!(
        "wrote signing key {} and sealing key to {}\nadd this to the broker's and every agent's configuration (both check every command's signature):\n",
        made.key_id,
        home.dir().display()
    );
    // Only the entry goes to stdout, so `dbvmctl keygen >> agent.toml` works.
    out(&made.trusted_key_toml())?;
    Ok(Exit::Success)
}

fn ca_init(ctx: &Ctx, options: &CaInitOptions) -> Result<Exit> {
    let home = ctx.home()?;
    let made = dbvmctl::ca_init(&home, options)?;
    let path = |f| home.path(f).display().to_string();
    use dbvmctl::HomeFile as F;
    out(&format!(
        "fleet CA:                  {} (key {})\n\
         broker certificate:        {} (key {}) for {}\n\
         control-plane certificate: {} (key {}) for {:?}\n",
        path(F::CaCert),
        path(F::CaKey),
        path(F::BrokerCert),
        path(F::BrokerKey),
        made.broker_names.join(", "),
        path(F::ControlPlaneCert),
        path(F::ControlPlaneKey),
        made.control_plane,
    ))?;
    Ok(Exit::Success)
}

async fn enroll_token(ctx: &Ctx, agent: &AgentId, ttl: Option<u64>, json: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let token = client
        .enrollment_token(agent.as_str(), ttl.map(Duration::from_secs))
        .await?;
    if json {
        out_json(&token)?;
    } else {
        out(&format!("{}\n", token.token))?;
    }
    Ok(Exit::Success)
}

async fn agents(ctx: &Ctx, json: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let agents = client.agents().await?;
    if json {
        out_json(&agents)?;
    } else {
        out(&output::agents_table(&agents, dbvm_protocol::now_ms()))?;
    }
    Ok(Exit::Success)
}

async fn revoke(ctx: &Ctx, agent: &AgentId, reason: Option<&str>, json: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let revocation = client
        .revoke(agent.as_str(), reason)
        .await
        .with_context(|| format!("cannot revoke the certificates of agent {agent}"))?;
    if json {
        out_json(&revocation)?;
    } else {
        out(&output::revocation_report(&revocation))?;
    }
    Ok(Exit::Success)
}

/// Colour for stdout: on a terminal, unless NO_COLOR or TERM=dumb says otherwise.
fn stdout_style() -> output::Style {
    let no_color = std::env::var("NO_COLOR").ok();
    let term = std::env::var("TERM").ok();
    output::Style::detect(
        std::io::stdout().is_terminal(),
        no_color.as_deref(),
        term.as_deref(),
    )
}

async fn health(
    ctx: &Ctx,
    agent: &AgentId,
    json: bool,
    fresh: bool,
    wide: bool,
    timeout: Duration,
) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let report = if fresh {
        let signer = home.signer()?;
        if ctx.verbose {
            eprintln!(
                "running the checks of agent {agent} now (up to {} s)",
                timeout.as_secs()
            );
        }
        tokio::select! {
            r = dbvmctl::health::fresh(&client, &signer, agent, timeout) => r?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("stopped waiting; the health command goes on: see it with `dbvmctl events --agent {agent}`");
                return Ok(Exit::CommandFailed);
            }
        }
    } else {
        client
            .health(agent.as_str())
            .await
            .with_context(|| format!("cannot read the health of agent {agent}"))?
    };
    if json {
        out_json(&report)?;
    } else {
        out(&output::health_table(
            &report,
            dbvm_protocol::now_ms(),
            stdout_style(),
            wide,
        ))?;
    }
    Ok(Exit::Success)
}

async fn fleet(ctx: &Ctx, json: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let fleet = client
        .fleet_health()
        .await
        .context("cannot read the fleet's health")?;
    if json {
        out_json(&fleet)?;
    } else {
        out(&output::fleet_table(
            &fleet,
            dbvm_protocol::now_ms(),
            stdout_style(),
        ))?;
    }
    Ok(Exit::Success)
}

/// Shows the command's progress while waiting: a spinner when stderr is a terminal,
/// plain lines with --verbose otherwise, nothing else.
struct Watch {
    bar: Option<ProgressBar>,
    lines: bool,
    last: RefCell<String>,
}

impl Watch {
    fn new(verbose: bool) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            // A bar of the command's percent (long work such as a backup reports it),
            // with its state and latest message beside it.
            let bar = ProgressBar::new(100);
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {elapsed:>4} [{bar:24}] {pos:>3}% {wide_msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let lines = bar.is_none() && verbose;
        Self {
            bar,
            lines,
            last: RefCell::new(String::new()),
        }
    }

    fn active(&self) -> bool {
        self.bar.is_some() || self.lines
    }

    fn update(&self, view: &CommandView) {
        if let Some(bar) = &self.bar {
            let mut line = format!(
                "{} {} on {}",
                view.state.as_str(),
                view.operation,
                view.agent_id
            );
            if let Some(p) = &view.progress {
                bar.set_position(u64::from(p.percent.min(100)));
                line.push_str(&format!(": {}", p.message));
            }
            bar.set_message(line);
            return;
        }
        // The final state is printed by the caller.
        if view.state.is_terminal() {
            return;
        }
        let line = output::command_state_line(view);
        if self.lines && *self.last.borrow() != line {
            eprintln!("{line}");
            *self.last.borrow_mut() = line;
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Waits for a command, showing progress; `None` when interrupted by Ctrl-C.
async fn wait_for(
    ctx: &Ctx,
    client: &Client,
    view: CommandView,
    timeout: Duration,
) -> Result<Option<CommandView>> {
    if view.state.is_terminal() {
        return Ok(Some(view));
    }
    let watch = Watch::new(ctx.verbose);
    watch.update(&view);
    // Short polls only when someone watches the progress; one long poll otherwise.
    let poll = if watch.active() {
        Duration::from_secs(1)
    } else {
        dbvmctl::client::MAX_POLL
    };
    let id = view.id;
    let waited = tokio::select! {
        r = dbvmctl::send::wait(client, view, timeout, poll, |v| watch.update(v)) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    watch.finish();
    match waited {
        Some(view) => Ok(Some(view?)),
        None => {
            eprintln!("stopped waiting; command {id} goes on: see it with `dbvmctl status {id}`");
            Ok(None)
        }
    }
}

/// Prints a command as asked (sealed values hidden unless revealed) and says which exit
/// code its state means.
fn show_command(
    view: &CommandView,
    show: &ShowArgs,
    opener: Option<&SealingKey>,
    waited: Option<Duration>,
) -> Result<Exit> {
    let shown = dbvmctl::send::readable(view, opener);
    let (value, revealed) = (shown.value, shown.revealed);
    if show.json {
        out_json(&value)?;
    } else {
        let shown: CommandView =
            serde_json::from_value(value).context("cannot decode the command view")?;
        out(&output::command_report(&shown))?;
    }
    revealed.with_context(|| {
        format!(
            "command {} is {}, but its output cannot be revealed with the sealing key in this home",
            view.id,
            view.state.as_str()
        )
    })?;
    Ok(match view.state {
        CommandState::Succeeded => Exit::Success,
        s if s.is_terminal() => Exit::CommandFailed,
        _ => match waited {
            Some(after) => {
                eprintln!(
                    "command {} is still {} after {} s; it goes on: wait again with `dbvmctl status {} --wait 300`",
                    view.id,
                    view.state.as_str(),
                    after.as_secs(),
                    view.id
                );
                Exit::CommandFailed
            }
            None => Exit::Success,
        },
    })
}

async fn send(ctx: &Ctx, a: SendArgs) -> Result<Exit> {
    // Everything local first: a usage or key problem stops before the broker is asked.
    let request = dbvmctl::send::Request {
        args: dbvmctl::parse_args(&a.args)?,
        secrets: {
            let mut all = dbvmctl::parse_secrets(&a.secrets)?;
            for (name, secret) in dbvmctl::read_secret_files(&a.secret_files)? {
                if all.iter().any(|(n, _)| *n == name) {
                    anyhow::bail!("secret {name:?} is given twice (--secret and --secret-file)");
                }
                all.push((name, secret));
            }
            all
        },
        ttl: Duration::from_secs(a.ttl),
        ..dbvmctl::send::Request::new(a.agent.clone(), &a.operation)
    };
    submit_and_show(
        ctx,
        request,
        a.no_wait,
        Duration::from_secs(a.timeout),
        &a.show,
    )
    .await
}

/// Submits a request, waits for it (unless `no_wait`) with progress, prints it.
async fn submit_and_show(
    ctx: &Ctx,
    request: dbvmctl::send::Request,
    no_wait: bool,
    timeout: Duration,
    show: &ShowArgs,
) -> Result<Exit> {
    let home = ctx.home()?;
    let opener = if show.reveal {
        Some(home.sealing_key()?)
    } else {
        None
    };
    let client = ctx.client(&home)?;
    let signer = home.signer()?;
    let sender = Sender::new(&client, &signer, home.sealing_public_key()?);
    let view = sender.submit(request).await?;
    if ctx.verbose {
        eprintln!(
            "submitted command {} ({} on {})",
            view.id, view.operation, view.agent_id
        );
    }
    if no_wait {
        return show_command(&view, show, opener.as_ref(), None);
    }
    match wait_for(ctx, &client, view, timeout).await? {
        Some(view) => show_command(&view, show, opener.as_ref(), Some(timeout)),
        None => Ok(Exit::CommandFailed),
    }
}

async fn status(ctx: &Ctx, id: Uuid, wait: u64, show: &ShowArgs) -> Result<Exit> {
    let home = ctx.home()?;
    let opener = if show.reveal {
        Some(home.sealing_key()?)
    } else {
        None
    };
    let client = ctx.client(&home)?;
    let view = client.command(id).await?;
    if wait == 0 {
        return show_command(&view, show, opener.as_ref(), None);
    }
    let timeout = Duration::from_secs(wait);
    match wait_for(ctx, &client, view, timeout).await? {
        Some(view) => show_command(&view, show, opener.as_ref(), Some(timeout)),
        None => Ok(Exit::CommandFailed),
    }
}

async fn upgrade(ctx: &Ctx, a: UpgradeArgs) -> Result<Exit> {
    use dbvmctl::upgrade::{Outcome, Plan, WaveEvent};
    let plan = Plan {
        binary: a.binary,
        version: a.agent_version,
        expected_sha256: a.sha256,
        deadline_s: a.deadline_s,
        wave_size: a.wave_size,
        artifact_url: a.artifact_url,
        agents: a.agents,
    };
    // Arguments first: a mistake stops before the home is read or the broker asked.
    plan.validate()?;
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let signer = home.signer()?;
    let sender = Sender::new(&client, &signer, home.sealing_public_key()?);
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message(format!("hashing and uploading {}", plan.binary.display()));
        bar
    });
    let say = |line: String| match &bar {
        Some(bar) => bar.println(line),
        None if ctx.verbose => eprintln!("{line}"),
        None => {}
    };
    let on_event = |event: WaveEvent<'_>| match event {
        WaveEvent::Artifact(art) => say(format!(
            "artifact {} ({} bytes) {}; agents download it from {}",
            art.sha256,
            art.size,
            if art.uploaded {
                "uploaded"
            } else {
                "already on the broker"
            },
            art.url
        )),
        WaveEvent::Started { wave, of, agents } => {
            let names: Vec<&str> = agents.iter().map(AgentId::as_str).collect();
            let line = format!("wave {wave}/{of}: upgrading {}", names.join(", "));
            if let Some(bar) = &bar {
                bar.set_message(line);
            } else {
                say(line);
            }
        }
        WaveEvent::Finished(r) => say(match (&r.outcome, &r.upgrade, &r.error) {
            (Outcome::Upgraded, Some(u), _) => format!(
                "{}: upgraded {} → {} in {} ms",
                r.agent,
                output::clean(&u.from.version),
                output::clean(&u.to.version),
                u.total_ms
            ),
            (_, _, Some(e)) => format!("{}: {}: {}", r.agent, r.outcome.as_str(), output::clean(e)),
            _ => format!("{}: {}", r.agent, r.outcome.as_str()),
        }),
    };
    let done = tokio::select! {
        r = dbvmctl::upgrade::upgrade(&client, &sender, &plan, on_event) => Some(r),
        _ = tokio::signal::ctrl_c() => None,
    };
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let Some(summary) = done else {
        eprintln!(
            "stopped; upgrades already sent go on: see `dbvmctl agents` and `dbvmctl events`"
        );
        return Ok(Exit::CommandFailed);
    };
    let summary = summary?;
    if a.json {
        out_json(&summary)?;
    } else {
        out(&output::upgrade_report(&summary))?;
    }
    if summary.all_upgraded() {
        return Ok(Exit::Success);
    }
    let failed: Vec<&str> = summary
        .agents
        .iter()
        .filter(|r| r.outcome == Outcome::Failed)
        .map(|r| r.agent.as_str())
        .collect();
    let skipped = summary.not_attempted();
    eprintln!(
        "dbvmctl: upgrade to {} failed on {}{}",
        summary.version,
        failed.join(", "),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; not attempted: {}", skipped.join(", "))
        }
    );
    Ok(Exit::CommandFailed)
}

async fn commands(
    ctx: &Ctx,
    query: Vec<(&str, String)>,
    mut cursor: Option<String>,
    all: bool,
    json: bool,
) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let mut every = Vec::new();
    loop {
        let mut q = query.clone();
        if let Some(c) = &cursor {
            q.push(("cursor", c.clone()));
        }
        let mut page = client
            .commands(&q)
            .await
            .context("cannot list the broker's commands")?;
        for c in &mut page.commands {
            if let Some(output) = &mut c.output {
                dbvmctl::redact(output);
            }
        }
        if !all {
            if json {
                out_json(&page)?;
            } else {
                let mut text = String::new();
                for c in &page.commands {
                    text.push_str(&output::command_state_line(c));
                    text.push('\n');
                }
                match &page.next_cursor {
                    Some(next) => text.push_str(&format!("more: --cursor {next}\n")),
                    None if page.commands.is_empty() => text.push_str("no commands\n"),
                    None => {}
                }
                out(&text)?;
            }
            return Ok(Exit::Success);
        }
        if !json {
            let mut text = String::new();
            for c in &page.commands {
                text.push_str(&output::command_state_line(c));
                text.push('\n');
            }
            if !out(&text)? {
                return Ok(Exit::Success);
            }
        }
        every.extend(page.commands);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    if json {
        out_json(&every)?;
    }
    Ok(Exit::Success)
}

async fn cancel(ctx: &Ctx, id: Uuid, json: bool) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    match client.cancel(id).await {
        Ok(view) => {
            if json {
                out_json(&view)?;
            } else {
                out(&format!("{}\n", output::command_state_line(&view)))?;
            }
            Ok(Exit::Success)
        }
        Err(ClientError::Http(status, e)) if status == reqwest::StatusCode::CONFLICT => {
            if json {
                out_json(&e)?;
            } else {
                eprintln!("dbvmctl: {}", e.error);
            }
            Ok(Exit::CommandFailed)
        }
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot cancel command {id}"))),
    }
}

/// Follows the event stream; a dropped connection is resumed after the last event seen.
async fn events(
    ctx: &Ctx,
    agent: Option<&AgentId>,
    after: Option<u64>,
    json: bool,
) -> Result<Exit> {
    let home = ctx.home()?;
    let client = ctx.client(&home)?;
    let mut last = after;
    let mut stream = client.events(agent.map(AgentId::as_str), last).await?;
    let style = stdout_style();
    let mut retries = 0u32;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            _ = tokio::signal::ctrl_c() => return Ok(Exit::Success),
        };
        let event = match item {
            None | Some(Err(ClientError::EventRead { .. } | ClientError::EventsIdle { .. })) => {
                // Resume where the stream stopped: nothing is lost unless the broker
                // pruned it meanwhile, which it says (`dropped`).
                if retries >= EVENTS_RESUME_TRIES {
                    return Err(StreamClosed(ctx.broker.clone()).into());
                }
                retries += 1;
                eprintln!(
                    "dbvmctl: the event stream closed; resuming{} (try {retries} of {EVENTS_RESUME_TRIES})",
                    last.map(|l| format!(" after event {l}")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_secs(u64::from(retries.min(5)))).await;
                match client.events(agent.map(AgentId::as_str), last).await {
                    Ok(s) => stream = s,
                    Err(e) if retries < EVENTS_RESUME_TRIES => {
                        eprintln!("dbvmctl: {e}");
                        stream = Box::pin(futures::stream::empty());
                    }
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
            Some(Ok(event)) => event,
            Some(Err(e @ ClientError::EventDecode { .. })) => {
                eprintln!("dbvmctl: skipped an event: {e}");
                continue;
            }
            Some(Err(e)) => return Err(e.into()),
        };
        retries = 0;
        if event.seq > 0 {
            last = Some(event.seq);
        } else if event.kind == "dropped" {
            eprintln!(
                "dbvmctl: the broker no longer keeps every event asked for ({}); list what you need again",
                event.data["reason"].as_str().unwrap_or("dropped")
            );
        }
        let mut event = event;
        dbvmctl::redact(&mut event.data);
        let line = if json {
            serde_json::to_string(&event).context("cannot encode the event as JSON")?
        } else {
            output::event_line(&event, style)
        };
        if !out(&format!("{line}\n"))? {
            return Ok(Exit::Success);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed_and_documents_exit_codes() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:"), "{help}");
        assert!(help.contains("3  broker, API or connection error"));
    }

    #[test]
    fn flags_parse_as_documented() {
        let cli = Cli::try_parse_from([
            "dbvmctl",
            "--dir",
            "/h",
            "send",
            "db1",
            "ping",
            "a=1",
            "--secret",
            "pw=x",
            "--ttl",
            "60",
            "--no-wait",
            "--json",
        ])
        .unwrap();
        assert_eq!(cli.dir, Some(PathBuf::from("/h")));
        let Command::Send(a) = cli.command else {
            panic!("not send")
        };
        assert_eq!(a.agent.as_str(), "db1");
        assert_eq!(a.args, ["a=1"]);
        assert_eq!(a.secrets, ["pw=x"]);
        assert_eq!(
            (a.ttl, a.timeout, a.no_wait, a.show.json),
            (60, 120, true, true)
        );

        let cli = Cli::try_parse_from([
            "dbvmctl",
            "ca",
            "init",
            "--broker-name",
            "b1",
            "10.0.0.1",
            "--broker-name",
            "b2,b3",
        ])
        .unwrap();
        let Command::Ca {
            command:
                CaCommand::Init {
                    broker_names,
                    control_plane,
                    ca_days,
                    ..
                },
        } = cli.command
        else {
            panic!("not ca init")
        };
        assert_eq!(broker_names, ["b1", "10.0.0.1", "b2", "b3"]);
        assert_eq!((control_plane.as_str(), ca_days), ("ops", 3650));

        let cli = Cli::try_parse_from(["dbvmctl", "health", "db1", "--fresh", "-w"]).unwrap();
        let Command::Health {
            agent,
            fresh,
            wide,
            json,
            timeout,
        } = cli.command
        else {
            panic!("not health")
        };
        assert_eq!(
            (agent.as_str(), fresh, wide, json, timeout),
            ("db1", true, true, false, 60)
        );
        assert!(Cli::try_parse_from(["dbvmctl", "fleet", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["dbvmctl", "health"]).is_err());

        // a bad agent id is a usage error
        assert!(Cli::try_parse_from(["dbvmctl", "agents", "--json"]).is_ok());
        let cli = Cli::try_parse_from([
            "dbvmctl", "agents", "revoke", "db1", "--reason", "stolen", "--json",
        ])
        .unwrap();
        let Command::Agents {
            command:
                Some(AgentsCommand::Revoke {
                    agent,
                    reason,
                    json,
                }),
            ..
        } = cli.command
        else {
            panic!("not agents revoke")
        };
        assert_eq!(
            (agent.as_str(), reason.as_deref(), json),
            ("db1", Some("stolen"), true)
        );
        assert!(Cli::try_parse_from(["dbvmctl", "agents", "revoke"]).is_err());
        assert!(Cli::try_parse_from(["dbvmctl", "agents", "revoke", "Bad/Id"]).is_err());
        assert!(Cli::try_parse_from(["dbvmctl", "enroll-token", "Bad/Id"]).is_err());
    }

    #[test]
    fn backup_commands_parse() {
        let cli = Cli::try_parse_from(["dbvmctl", "backup", "db1", "--type", "full"]).unwrap();
        let Command::Backup {
            agent,
            kind,
            command: None,
            ..
        } = cli.command
        else {
            panic!("not backup")
        };
        assert_eq!((agent.unwrap().as_str(), kind.as_str()), ("db1", "full"));
        assert!(Cli::try_parse_from(["dbvmctl", "backup", "db1", "--type", "diff"]).is_err());
        let cli = Cli::try_parse_from(["dbvmctl", "backup", "verify", "db1", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Backup {
                command: Some(BackupCommand::Verify { .. }),
                ..
            }
        ));
        let storage = [
            "--endpoint",
            "https://localhost:9443",
            "--bucket",
            "bkp",
            "--access-key-file",
            "/k",
            "--secret-key-file",
            "/s",
        ];
        let mut argv = vec!["dbvmctl", "backup", "configure", "db1"];
        argv.extend(storage);
        assert!(Cli::try_parse_from(&argv).is_ok());
        let mut argv = vec!["dbvmctl", "restore", "db2", "--prefix", "db1"];
        argv.extend(storage);
        argv.extend(["--target", "2026-12-03T18:00:00Z"]);
        let Command::Restore { target, engine, .. } = Cli::try_parse_from(&argv).unwrap().command
        else {
            panic!("not restore")
        };
        assert_eq!(
            (target.as_str(), engine.as_str()),
            ("2026-12-03T18:00:00Z", "postgres")
        );
        // Keys are never arguments: no flag takes them.
        assert!(Cli::try_parse_from([
            "dbvmctl",
            "backup",
            "configure",
            "db1",
            "--secret-key",
            "x"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["dbvmctl", "recover", "db1"]).is_err());
        assert!(Cli::try_parse_from(["dbvmctl", "recover", "db1", "--target", "latest"]).is_ok());
        assert!(Cli::try_parse_from(["dbvmctl", "backups", "db1", "--json"]).is_ok());
    }

    #[test]
    fn upgrade_parses_and_refuses_bad_plans_before_anything_is_read() {
        let cli = Cli::try_parse_from([
            "dbvmctl",
            "upgrade",
            "--binary",
            "/tmp/dbvm-agent",
            "--version",
            "0.1.1",
            "--wave-size",
            "2",
            "db1",
            "db2",
            "db3",
        ])
        .unwrap();
        let Command::Upgrade(a) = cli.command else {
            panic!("not upgrade")
        };
        assert_eq!(
            (a.agent_version.as_str(), a.wave_size, a.deadline_s, a.json),
            ("0.1.1", 2, 60, false)
        );
        assert_eq!(a.agents.len(), 3);
        assert!(
            Cli::try_parse_from(["dbvmctl", "upgrade", "--binary", "b", "--version", "1"]).is_err()
        );
        assert!(Cli::try_parse_from(["dbvmctl", "upgrade", "--version", "1", "db1"]).is_err());
        assert!(Cli::try_parse_from([
            "dbvmctl",
            "upgrade",
            "--binary",
            "b",
            "--version",
            "1",
            "Bad/Id"
        ])
        .is_err());
        // The top-level --version still prints dbvmctl's own.
        let e = Cli::try_parse_from(["dbvmctl", "--version"]).err().unwrap();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);

        // A bad plan is a usage error before the home directory is even read (it does
        // not exist here) and before anything is uploaded or sent.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (flag, value, says) in [
            ("--wave-size", "0", "wave size"),
            ("--version", "v1", "version"),
            ("--sha256", "ABC", "SHA-256"),
            ("--deadline-s", "5", "deadline"),
        ] {
            let mut argv = vec![
                "dbvmctl",
                "--dir",
                "/nonexistent/home",
                "upgrade",
                "--binary",
                "/nonexistent/agent",
                "--version",
                "0.1.1",
            ];
            if flag == "--version" {
                argv.truncate(argv.len() - 2);
            }
            argv.extend([flag, value, "db1"]);
            let cli = Cli::try_parse_from(&argv).unwrap();
            let e = runtime.block_on(run(cli)).unwrap_err();
            assert_eq!(exit_code_of(&e), Exit::Usage, "{e:#}");
            assert!(format!("{e:#}").contains(says), "{flag}: {e:#}");
        }
    }

    #[test]
    fn errors_map_to_exit_codes() {
        let usage: anyhow::Error = dbvmctl::parse_args(&["x".into()]).unwrap_err().into();
        assert_eq!(exit_code_of(&usage), Exit::Usage);
        let api = ClientError::Http(
            reqwest::StatusCode::TOO_MANY_REQUESTS,
            dbvm_protocol::api::ApiError {
                code: "busy".into(),
                error: "full".into(),
                state: None,
            },
        );
        let api = anyhow::Error::from(api).context("sending");
        assert_eq!(exit_code_of(&api), Exit::Broker);
        let not_ready: anyhow::Error = SendError::AgentNotReady {
            agent: AgentId::new("db1").unwrap(),
            reason: "never connected".into(),
        }
        .into();
        assert_eq!(exit_code_of(&not_ready), Exit::Broker);
        let refused: anyhow::Error = SendError::Client(ClientError::Http(
            reqwest::StatusCode::FORBIDDEN,
            dbvm_protocol::api::ApiError {
                code: "bad_signature".into(),
                error: "no".into(),
                state: None,
            },
        ))
        .into();
        assert_eq!(exit_code_of(&refused), Exit::Broker);
        let bad_ttl: anyhow::Error = SendError::Sign(dbvmctl::SignError::TtlTooShort).into();
        assert_eq!(exit_code_of(&bad_ttl), Exit::Usage);
        let offline: anyhow::Error = HealthError::NotConnected("db1".into()).into();
        assert_eq!(exit_code_of(&offline), Exit::Broker);
        let rejected: anyhow::Error = HealthError::Unsupported {
            agent: "db1".into(),
            version: "0.1.0".into(),
        }
        .into();
        assert_eq!(exit_code_of(&rejected), Exit::CommandFailed);
        assert_eq!(Exit::CommandFailed as u8, 1);
    }
}
