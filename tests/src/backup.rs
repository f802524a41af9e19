//! The rig the backup tests share (`tests/backup*.rs`): a broker, a client, the private
//! Docker engine, an S3 server (s3s-fs behind stunnel), and agents made on demand with
//! their own data roots; every call a signed command, S3 keys sealed to the agent. Also a
//! tmpfs for tests that need a small or full data disk.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::s3::S3Server;
use crate::{AgentProc, BrokerProc, Fleet};
use dbvm_protocol::api::{CommandState, CommandView};
use dbvm_protocol::seal::Sealed;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One VM: its agent and the port its database gets.
pub struct Vm {
    pub agent: AgentProc,
    pub port: u16,
    /// The agent's config section, to start it again the same way.
    pub section: String,
}

/// Removes the containers of every VM it made (the database's and its one-shots) when
/// dropped. Drop its VMs first (locals declared after it are): an agent still running
/// starts its database's container again.
pub struct Rig {
    pub fleet: Fleet,
    pub broker: BrokerProc,
    pub client: dbvmctl::Client,
    pub engine: crate::docker::Engine,
    pub s3: S3Server,
    vms: Vec<String>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &self.vms {
            for suffix in [
                "", "-init", "-backup", "-info", "-restore", "-recover", "-verify",
            ] {
                self.engine.remove_container(&format!("{c}{suffix}"));
            }
        }
    }
}

impl Rig {
    pub async fn new() -> Self {
        let engine = crate::docker::engine();
        let fleet = Fleet::new();
        let broker = fleet.start_broker("");
        let client = fleet.client(&broker);
        let s3 = S3Server::start(&fleet.path("s3"));
        Self {
            fleet,
            broker,
            client,
            engine,
            s3,
            vms: Vec::new(),
        }
    }

    /// An enrolled agent with its own data root (`<id>-db`) and container; storage calls
    /// give up after 5 s so that failures are quick; MariaDB's binlogs rotate and upload
    /// every second.
    pub async fn vm(&mut self, id: &str) -> Vm {
        self.vm_env(id, &[]).await
    }

    /// [`Self::vm`] with extra environment variables for the agent.
    pub async fn vm_env(&mut self, id: &str, env: &[(&str, &str)]) -> Vm {
        let container = crate::docker::unique_name("dbvm-bk");
        self.vms.push(container.clone());
        let section =
            self.engine
                .database_section(&self.fleet.path(&format!("{id}-db")), &container, 1, "");
        let section = format!(
            "{section}\n[backup]\nio_timeout_s = 5\nbinlog_rotate_s = 1\ncloud_copy_s = 1\n"
        );
        let token = self
            .client
            .enrollment_token(id, None)
            .await
            .expect("enrollment token")
            .token;
        let agent =
            self.fleet
                .start_agent_env(id, self.broker.agent_addr, Some(&token), &section, env);
        crate::connected(&self.client, id).await;
        Vm {
            agent,
            port: crate::docker::free_port(),
            section,
        }
    }

    pub async fn send(&self, vm: &Vm, operation: &str, args: Value) -> CommandView {
        self.fleet
            .send(&self.client, &vm.agent, operation, args)
            .await
    }

    pub async fn ok(&self, vm: &Vm, operation: &str, args: Value) -> Value {
        self.fleet
            .send_ok(&self.client, &vm.agent, operation, args)
            .await
    }

    /// A command that must fail or be rejected: its state and `code: message`.
    pub async fn refused(&self, vm: &Vm, operation: &str, args: Value) -> (CommandState, String) {
        let v = self.send(vm, operation, args).await;
        assert!(
            matches!(v.state, CommandState::Failed | CommandState::Rejected),
            "{operation} should fail: {v:?}"
        );
        (
            v.state,
            v.error
                .map(|e| format!("{}: {}", e.code, e.message))
                .unwrap_or_default(),
        )
    }

    /// [`Self::refused`], its message alone.
    pub async fn refused_message(&self, vm: &Vm, operation: &str, args: Value) -> String {
        self.refused(vm, operation, args).await.1
    }

    /// `secret` sealed to the VM's agent.
    pub async fn seal_to(&self, vm: &Vm, secret: &str) -> Sealed {
        let agent = self
            .client
            .agents()
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.id == vm.agent.id)
            .expect("agent listed");
        let key = dbvm_protocol::seal::parse_public_key(&agent.sealing_key.expect("sealing key"))
            .unwrap();
        Sealed::seal(&key, secret).unwrap()
    }

    /// The S3 server's location for `bucket` (and `prefix`), as the operations take it.
    pub fn location(&self, bucket: &str, prefix: Option<&str>) -> Value {
        let mut l = json!({
            "endpoint": self.s3.endpoint_url(),
            "bucket": bucket,
            "region": self.s3.region,
            "ca_pem": std::fs::read_to_string(&self.s3.ca_pem_path).unwrap(),
        });
        if let Some(p) = prefix {
            l["prefix"] = json!(p);
        }
        l
    }

    /// The access key and `secret`, sealed to the VM's agent.
    pub async fn keys(&self, vm: &Vm, secret: &str) -> (Sealed, Sealed) {
        (
            self.seal_to(vm, &self.s3.access_key).await,
            self.seal_to(vm, secret).await,
        )
    }

    /// The `dbaas` password a create or restore returned, opened.
    pub fn password(&self, out: &Value) -> String {
        let sealed: Sealed = serde_json::from_value(out["password"].clone()).expect("sealed");
        self.fleet
            .reply_key
            .open(&sealed)
            .unwrap()
            .expose()
            .to_string()
    }

    /// The status and message of one check in a fresh report (a signed `health` command).
    pub async fn check(&self, vm: &Vm, id: &str) -> (String, String) {
        let out = self.ok(vm, "health", json!({})).await;
        let c = out["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["check"] == id))
            .unwrap_or_else(|| panic!("no check {id}: {out}"))
            .clone();
        (
            c["status"].as_str().unwrap_or("").to_string(),
            c["message"].as_str().unwrap_or("").to_string(),
        )
    }

    /// The VM's data root.
    pub fn data_root(&self, vm: &Vm) -> PathBuf {
        self.fleet.path(&format!("{}-db", vm.agent.id))
    }
}

/// A tmpfs mounted for a test (a small data disk), unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs on {}", dir.display());
        Self(dir.to_path_buf())
    }

    pub fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A PostgreSQL superuser session over the database's unix socket (root reaches its 0700
/// directory), for what `dbaas` may not do.
pub async fn pg_super(data_root: &Path, port: u16) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(data_root.join("run"))
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect as postgres over the socket");
    tokio::spawn(conn);
    client
}

/// Closes PostgreSQL's current WAL segment and waits until it says it is archived.
pub async fn archive_now(c: &tokio_postgres::Client) {
    let seg: String = c
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .unwrap()
        .get(0);
    crate::eventually(
        std::time::Duration::from_secs(60),
        "the WAL segment archived",
        || async {
            let row = c
                .query_one(
                    "SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver",
                    &[],
                )
                .await
                .ok()?;
            let last: String = row.get(0);
            (last.as_str() >= seg.as_str()).then_some(())
        },
    )
    .await;
}

/// An RFC 3339 time as milliseconds since the epoch.
pub fn ms(rfc3339: &str) -> i64 {
    (time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp_nanos()
        / 1_000_000) as i64
}

/// The MariaDB backup tests' database: `app`, a table `t (id, pad)`, the `dbaas` user.
pub mod maria {
    use super::{Rig, Vm};
    use mysql_async::prelude::Queryable;
    use serde_json::json;

    /// A MariaDB database `app` on the VM; its dbaas password.
    pub async fn create(rig: &Rig, vm: &Vm) -> String {
        let out = rig
            .ok(
                vm,
                "db.create",
                json!({"engine": "mariadb", "database": "app", "port": vm.port}),
            )
            .await;
        rig.password(&out)
    }

    /// `dbaas` on `app` over TCP.
    pub async fn connect(port: u16, password: &str) -> mysql_async::Conn {
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(port)
            .user(Some("dbaas"))
            .pass(Some(password))
            .db_name(Some("app"))
            .prefer_socket(false);
        mysql_async::Conn::new(opts).await.expect("dbaas connects")
    }

    /// Rows `from..=to` of `t`.
    pub async fn insert(c: &mut mysql_async::Conn, from: i32, to: i32) {
        c.exec_drop(
            "INSERT INTO t (id, pad) SELECT seq, REPEAT('x', 200) FROM seq_1_to_1000000 WHERE seq BETWEEN ? AND ?",
            (from, to),
        )
        .await
        .unwrap();
    }

    /// `COUNT(*)` and `MAX(id)` of `t`.
    pub async fn count_max(c: &mut mysql_async::Conn) -> (i64, Option<i64>) {
        c.query_first("SELECT COUNT(*), MAX(id) FROM t")
            .await
            .unwrap()
            .unwrap()
    }

    /// The server's clock, as an RFC 3339 time with milliseconds.
    pub async fn now(c: &mut mysql_async::Conn) -> String {
        let s: String = c
            .query_first("SELECT DATE_FORMAT(UTC_TIMESTAMP(3), '%Y-%m-%dT%H:%i:%s.%fZ')")
            .await
            .unwrap()
            .unwrap();
        // %f gives microseconds: keep milliseconds.
        let (head, frac) = s.trim_end_matches('Z').split_once('.').unwrap();
        format!("{head}.{}Z", &frac[..3])
    }
}

/// PostgreSQL's clock now (`now()`: the transaction's start), RFC 3339 in UTC with
/// milliseconds.
pub async fn pg_now(c: &tokio_postgres::Client) -> String {
    c.query_one(
        "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}
