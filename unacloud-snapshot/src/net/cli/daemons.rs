//! The daemons' subcommands: the metadata server and the launcher, with the launcher's
//! events and its last words.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::args::{LauncherArgs, MetadataArgs};
use super::etcd::{etcd_control, launcher_etcd};
use super::{base_config, cancel_on_signals, runtime};
use crate::net::daemon::{
    run_launcher, BackendKind, HypervisorSection, LauncherEvent, LauncherOptions, LauncherSection,
    MetadataSection, VmConfig,
};
use crate::net::node::spawn_metadata_server;
use crate::net::{Error, Result};
use crate::protocol::{ClusterId, MetadataServerConfig};

pub(super) fn metadata(a: MetadataArgs) -> Result<()> {
    let mut cfg = base_config(&a.config, Some(&a.key), None)?;
    let mut section = cfg.metadata.take().unwrap_or(MetadataSection {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 7000)),
        base_port: 7100,
        results_csv: None,
        max_registrations: None,
    });
    if let Some(l) = a.listen {
        section.listen = l;
    }
    if let Some(p) = a.base_port {
        section.base_port = p;
    }
    if let Some(p) = a.results_csv {
        section.results_csv = Some(p);
    }
    if let Some(n) = a.max_registrations {
        section.max_registrations = Some(n as usize);
    }
    let mut ms_cfg = MetadataServerConfig::new(ClusterId(cfg.cluster), section.base_port);
    if let Some(n) = section.max_registrations {
        ms_cfg.max_registrations = n;
    }
    let transport = cfg.transport()?;
    runtime(2)?.block_on(async move {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        let listener = tokio::net::TcpListener::bind(section.listen)
            .await
            .map_err(|source| Error::Network {
                peer: section.listen.to_string(),
                action: "listen",
                source,
            })?;
        let max = ms_cfg.max_registrations;
        let h = spawn_metadata_server(ms_cfg, listener, transport, section.results_csv.clone())?;
        tracing::info!(
            listen = %h.local_addr(),
            cluster = cfg.cluster,
            base_port = section.base_port,
            max_registrations = max,
            "metadata server listening"
        );
        eprintln!("metadata server listening on {}", h.local_addr());
        token.cancelled().await;
        h.stop().await;
        eprintln!("metadata server stopped");
        Ok(())
    })
}

pub(super) fn launcher(a: LauncherArgs) -> Result<()> {
    let ms = (!a.control.is_etcd()).then_some(&a.ms);
    let mut cfg = base_config(&a.config, Some(&a.key), ms)?;
    if let Some(v) = a.snapshot_timeout_ms {
        cfg.snapshot_timeout_ms = Some(v);
    }
    if let Some(v) = a.precheck_timeout_ms {
        cfg.precheck_timeout_ms = Some(v);
    }
    let mut section = match cfg.launcher.take() {
        Some(s) => s,
        None => LauncherSection {
            advertise: a.advertise.ok_or_else(|| Error::InvalidConfig {
                reason: "--advertise IP is required (or a [launcher] section)".to_string(),
            })?,
            cluster_size: a.cluster_size.ok_or_else(|| Error::InvalidConfig {
                reason: "--cluster-size N is required (or a [launcher] section)".to_string(),
            })?,
            backend: BackendKind::default(),
            catalog: None,
            run_dir: None,
            hypervisor: None,
            vms: Vec::new(),
        },
    };
    if let Some(ip) = a.advertise {
        section.advertise = ip;
    }
    if let Some(n) = a.cluster_size {
        section.cluster_size = n;
    }
    if let Some(b) = a.backend {
        section.backend = b;
    }
    if let (Some(backend), Some(root)) = (a.hypervisor, a.hv_root) {
        section.hypervisor = Some(HypervisorSection {
            backend,
            root,
            live: true,
            margin_mb: a.margin_mb.unwrap_or(64),
            accel: a.accel,
        });
    }
    if let Some(p) = a.catalog {
        section.catalog = Some(p);
    }
    if let Some(d) = a.run_dir {
        section.run_dir = Some(d);
    }
    if let Some(name) = a.vm {
        section.vms.push(VmConfig {
            name,
            netns: a.netns,
            tap: a.tap,
            freeze_pid: a.freeze_pid,
            hold_ms: a.hold_ms.unwrap_or(0),
            lab_sleep_ms: a.lab_sleep_ms,
            ..VmConfig::default()
        });
    }
    cfg.launcher = Some(section);
    let opts = LauncherOptions {
        crash_after_step: a.crash_after_step,
        registration_timeout: a.registration_timeout_ms.map(Duration::from_millis),
    };
    let json = a.events_json;
    let mut stopped = StopSummary::default();
    runtime(1)?.block_on(async {
        let token = CancellationToken::new();
        cancel_on_signals(token.clone())?;
        let on_event = |ev: LauncherEvent| {
            stopped.note(&ev);
            print_event(&ev, json);
        };
        if a.control.is_etcd() {
            launcher_etcd(&cfg, &etcd_control(&a.control)?, opts, token, on_event).await
        } else {
            run_launcher(&cfg, opts, token, on_event).await
        }
    })?;
    eprintln!("{}", stopped.line());
    Ok(())
}

/// What the launcher's last words say: how many VMs stopped, and whether any rule or
/// error was left.
#[derive(Debug, Default)]
struct StopSummary {
    vms: usize,
    leftovers: usize,
    errors: Vec<String>,
    interrupted: Option<String>,
}

impl StopSummary {
    fn note(&mut self, ev: &LauncherEvent) {
        match ev {
            LauncherEvent::Summary { vm, summary, .. } => {
                self.vms += 1;
                self.leftovers += summary.leftovers;
                if let Some(e) = &summary.error {
                    self.errors.push(format!("{vm}: {e}"));
                }
            }
            LauncherEvent::Interrupted { phase } => self.interrupted = Some(phase.clone()),
            _ => {}
        }
    }

    fn line(&self) -> String {
        let mut s = match &self.interrupted {
            Some(phase) => format!("launcher stopped while {phase}"),
            None => "launcher stopped".to_string(),
        };
        s.push_str(&format!(
            ": {} VM{}, ",
            self.vms,
            if self.vms == 1 { "" } else { "s" }
        ));
        if self.leftovers == 0 {
            s.push_str("every packet-colouring rule removed");
        } else {
            s.push_str(&format!(
                "{} packet-colouring objects left behind",
                self.leftovers
            ));
        }
        if !self.errors.is_empty() {
            s.push_str(&format!("; errors: {}", self.errors.join("; ")));
        }
        s
    }
}

/// One event: a JSON line on standard output, or a `name key=value …` line on standard
/// error.
fn print_event(ev: &LauncherEvent, json: bool) {
    let Ok(v) = serde_json::to_value(ev) else {
        return;
    };
    if json {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
        return;
    }
    let Some(obj) = v.as_object() else { return };
    let mut line = obj
        .get("event")
        .and_then(|e| e.as_str())
        .unwrap_or("event")
        .to_string();
    for (k, val) in obj.iter().filter(|(k, _)| *k != "event") {
        match val {
            serde_json::Value::String(s) => line.push_str(&format!(" {k}={s:?}")),
            other => line.push_str(&format!(" {k}={other}")),
        }
    }
    eprintln!("{line}");
}
