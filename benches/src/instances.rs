//! Release `shop-server` processes on free loopback ports, over a fresh PostgreSQL database.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database};

pub const ADMIN_TOKEN: &str = "bench-admin-token";

/// Builds `shop-server` in release mode and returns its path (or `BENCH_SERVER_BINARY`'s).
pub fn build_release() -> Result<PathBuf, String> {
    // `BENCH_SERVER_BINARY` runs a server built elsewhere (another commit's, for an A/B) and builds nothing.
    if let Some(binary) = std::env::var_os("BENCH_SERVER_BINARY") {
        return Ok(PathBuf::from(binary));
    }
    // The cargo that runs us (`cargo run` sets CARGO), else rustup's proxy: a toolchain's cargo called directly
    // bypasses rustup, which then resolves a toolchain of its own for the rustc it spawns.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        // Both packages in one build: built alone, shop-server unifies features differently and every switch
        // between the two rebuilds sqlx and rustls.
        .args(["build", "--release", "-p", "shop-server", "-p", "shop-bench"])
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !status.success() {
        return Err("cargo build --release -p shop-server failed".into());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release").join("shop-server"))
}

/// A database that is dropped when the run ends.
pub struct FreshDatabase {
    admin_url: String,
    pub name: String,
    pub url: String,
}

impl FreshDatabase {
    pub async fn create(admin_url: &str) -> Result<Self, String> {
        let admin = Database::connect(admin_url).await.map_err(|e| format!("PostgreSQL at {admin_url}: {e}"))?;
        let name = format!("shop_bench_{}", uuid::Uuid::new_v4().simple());
        admin.execute_unprepared(&format!("CREATE DATABASE \"{name}\"")).await.map_err(|e| e.to_string())?;
        admin.close().await.ok();
        let (base, _) = admin_url.rsplit_once('/').ok_or("the PostgreSQL URL needs a database path")?;
        Ok(Self { admin_url: admin_url.to_owned(), url: format!("{base}/{name}"), name })
    }

    pub async fn drop_now(self) {
        if let Ok(admin) = Database::connect(self.admin_url.as_str()).await {
            let _ = admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)).await;
            admin.close().await.ok();
        }
    }
}

/// Running server processes; killed on drop.
pub struct Instances {
    children: Vec<Child>,
    pub bases: Vec<String>,
}

impl Drop for Instances {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Starts `count` instances with these extra `SHOP_*` settings and waits until each answers `/health/ready`.
/// The schema is migrated once first, as a deployment does, so that the instances do not race to create it.
pub async fn start(binary: &PathBuf, count: usize, env: &[(String, String)]) -> Result<Instances, String> {
    let mut migrate = Command::new(binary);
    migrate.arg("migrate").env("RUST_LOG", "warn").stdout(Stdio::null());
    for (k, v) in env {
        migrate.env(k, v);
    }
    let migrated = migrate.status().map_err(|e| format!("shop-server migrate: {e}"))?;
    if !migrated.success() {
        return Err("shop-server migrate failed".into());
    }
    let mut instances = Instances { children: Vec::new(), bases: Vec::new() };
    for _ in 0..count {
        let port = free_port()?;
        let mut command = Command::new(binary);
        // `BENCH_SERVER_LOG` (a RUST_LOG filter) shows the servers' logs, e.g. the order batches' timings with
        // `warn,shop_domain::services::batch=debug`; by default only warnings, so logging costs nothing.
        let log = std::env::var("BENCH_SERVER_LOG").ok();
        command
            .env("SHOP_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("SHOP_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("SHOP_SEED_DEMO", "false")
            .env("SHOP_LOG_FORMAT", if log.is_some() { "json" } else { "text" })
            .env("RUST_LOG", log.as_deref().unwrap_or("warn"))
            .stdout(if log.is_some() { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        instances.children.push(command.spawn().map_err(|e| format!("starting {}: {e}", binary.display()))?);
        instances.bases.push(format!("http://127.0.0.1:{port}"));
    }
    let client = reqwest::Client::new();
    for base in &instances.bases {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client.get(format!("{base}/health/ready")).send().await.is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{base} did not become ready"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(instances)
}

/// Throwaway redis-server processes, the independent nodes Redlock needs; killed on drop.
pub struct RedisNodes {
    children: Vec<Child>,
    pub urls: Vec<String>,
}

impl Drop for RedisNodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl RedisNodes {
    pub async fn start(n: usize) -> Result<Self, String> {
        let mut nodes = Self { children: Vec::new(), urls: Vec::new() };
        for _ in 0..n {
            let port = free_port()?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("redis-server: {e}"))?;
            nodes.children.push(child);
            nodes.urls.push(format!("redis://127.0.0.1:{port}"));
        }
        for url in &nodes.urls {
            let addr = url.trim_start_matches("redis://").to_owned();
            let deadline = Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(&addr).await.is_err() {
                if Instant::now() > deadline {
                    return Err(format!("redis-server at {addr} did not start"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(nodes)
    }
}
