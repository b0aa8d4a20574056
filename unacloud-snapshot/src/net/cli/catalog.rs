//! The `catalog` subcommand: a catalog file or the catalog in etcd printed as a table or
//! as JSON, and the timing results in etcd as CSV.

use std::path::Path;
use std::time::Duration;

use super::args::CatalogArgs;
use super::base_config;
#[cfg(feature = "etcd")]
use super::etcd::etcd_control;
#[cfg(not(feature = "etcd"))]
use super::etcd::no_etcd;
#[cfg(feature = "etcd")]
use super::runtime;
use crate::catalog_store::CatalogStore;
use crate::net::daemon::{default_catalog_path, DaemonConfig};
use crate::net::{Error, Result};
use crate::protocol::Catalog;
#[cfg(feature = "etcd")]
use crate::protocol::ClusterId;

pub(super) fn catalog(a: CatalogArgs) -> Result<()> {
    let cfg = base_config(&a.config, None, None)?;
    if a.control.is_etcd() {
        return etcd_catalog(&cfg, &a);
    }
    if a.times_csv {
        return Err(Error::InvalidConfig {
            reason: "--times-csv reads the catalog in etcd: add --control etcd --etcd ENDPOINTS \
                     (with the embedded control plane the metadata server writes the CSV, \
                     its --results-csv)"
                .to_string(),
        });
    }
    let path = a
        .catalog
        .or_else(|| cfg.launcher.as_ref().and_then(|l| l.catalog.clone()))
        .unwrap_or_else(|| default_catalog_path(cfg.cluster));
    let store = CatalogStore::new(&path);
    let catalog = store.load()?.ok_or_else(|| Error::InvalidConfig {
        reason: format!(
            "there is no catalog file {}: a coordinator writes it when its first global \
             snapshot starts (its launcher's --catalog; default \
             /var/lib/unacloud/catalog-<cluster>.json); pass --catalog FILE",
            path.display()
        ),
    })?;
    if a.json {
        println!("{}", catalog_json(&path, &catalog));
    } else {
        print!("{}", catalog_table(&path, &catalog));
    }
    Ok(())
}

/// The catalog as one JSON object: `path`, `cluster`, `last_started`,
/// `last_resume_attempt` and `completed` (oldest first, each with `gs`, `participants`,
/// `global_time_us` and `local_times`).
fn catalog_json(path: &Path, c: &Catalog) -> serde_json::Value {
    serde_json::json!({
        "path": path.display().to_string(),
        "cluster": c.cluster.0,
        "last_started": c.last_started.map(|g| g.0),
        "last_resume_attempt": c.last_resume_attempt.map(|a| a.0),
        "completed": c.completed.values().collect::<Vec<_>>(),
    })
}

fn seconds(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

/// The catalog as a table, one completed global snapshot per row.
fn catalog_table(path: &Path, c: &Catalog) -> String {
    let mut out = format!(
        "catalog {} ({}): {} completed global snapshot{}",
        path.display(),
        c.cluster,
        c.completed.len(),
        if c.completed.len() == 1 { "" } else { "s" }
    );
    if let Some(gs) = c.last_started {
        out.push_str(&format!(", last started {gs}"));
    }
    if let Some(a) = c.last_resume_attempt {
        out.push_str(&format!(", last resume attempt {}", a.0));
    }
    out.push('\n');
    if c.completed.is_empty() {
        return out;
    }
    let header = ["GS", "PARTICIPANTS", "GLOBAL TIME", "LOCAL TIMES"];
    let rows: Vec<[String; 4]> = c
        .completed
        .values()
        .map(|s| {
            let participants: Vec<String> =
                s.participants.iter().map(|p| p.0.to_string()).collect();
            let locals: Vec<String> = s
                .local_times
                .iter()
                .map(|l| format!("{}: {}", l.participant.0, seconds(l.local_time)))
                .collect();
            [
                s.gs.to_string(),
                participants.join(","),
                seconds(s.global_time),
                locals.join(", "),
            ]
        })
        .collect();
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].len())
            .chain(std::iter::once(header[i].len()))
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    let mut line = |cells: [&str; 4]| {
        out.push_str(&format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
        ));
    };
    line(header);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3]]);
    }
    out
}

/// `catalog --control etcd`: the catalog as etcd holds it (the path shown is the key
/// prefix), or its timing results as CSV.
#[cfg(feature = "etcd")]
fn etcd_catalog(cfg: &DaemonConfig, a: &CatalogArgs) -> Result<()> {
    let control = etcd_control(&a.control)?;
    let ec = crate::control::EtcdConfig::new(control.endpoints, ClusterId(cfg.cluster));
    let times = a.times_csv;
    let (catalog, csv, prefix) = runtime(1)?.block_on(async move {
        let etcd = crate::control::Etcd::connect(&ec).await?;
        let cat = crate::control::catalog::load(&etcd).await?;
        let csv = if times {
            Some(crate::control::catalog::times_csv(&etcd).await?)
        } else {
            None
        };
        Ok::<_, crate::control::ControlError>((cat, csv, etcd.key("catalog/")))
    })?;
    if let Some(csv) = csv {
        print!("{csv}");
    } else if a.json {
        println!("{}", catalog_json(Path::new(&prefix), &catalog));
    } else {
        print!("{}", catalog_table(Path::new(&prefix), &catalog));
    }
    Ok(())
}

#[cfg(not(feature = "etcd"))]
fn etcd_catalog(_: &DaemonConfig, _: &CatalogArgs) -> Result<()> {
    Err(no_etcd())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{
        ClusterId, CompletedSnapshot, GlobalSnapshotId, LocalTime, ParticipantId,
    };

    fn sample() -> Catalog {
        let mut c = Catalog::new(ClusterId(42));
        c.last_started = Some(GlobalSnapshotId(3));
        for gs in [1u64, 3] {
            c.completed.insert(
                GlobalSnapshotId(gs),
                CompletedSnapshot {
                    gs: GlobalSnapshotId(gs),
                    participants: vec![ParticipantId(0), ParticipantId(1)],
                    local_times: vec![
                        LocalTime {
                            participant: ParticipantId(0),
                            local_time: Duration::from_millis(1_950),
                        },
                        LocalTime {
                            participant: ParticipantId(1),
                            local_time: Duration::from_millis(2_400),
                        },
                    ],
                    global_time: Duration::from_millis(3_060 + gs),
                },
            );
        }
        c
    }

    #[test]
    fn a_catalog_reads_as_a_table_and_as_json() {
        let t = catalog_table(Path::new("c.json"), &sample());
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].contains("cluster-42")
                && lines[0].contains("2 completed global snapshots")
                && lines[0].contains("last started gs-3"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("GS ") && lines[1].contains("LOCAL TIMES"),
            "{t}"
        );
        assert!(
            lines[2].starts_with("gs-1 ")
                && lines[2].contains("0,1")
                && lines[2].contains("3.061 s")
                && lines[2].contains("0: 1.950 s, 1: 2.400 s"),
            "{t}"
        );
        assert!(lines[3].starts_with("gs-3 "), "{t}");
        let j = catalog_json(Path::new("c.json"), &sample());
        assert_eq!(j["cluster"], 42);
        assert_eq!(j["completed"][1]["gs"], 3);
        assert_eq!(j["completed"][0]["global_time_us"], 3_061_000);
        assert_eq!(j["completed"][0]["local_times"][1]["participant"], 1);
        let empty = catalog_table(Path::new("c.json"), &Catalog::new(ClusterId(1)));
        assert_eq!(empty.lines().count(), 1, "{empty}");
        assert!(empty.contains("0 completed global snapshots"), "{empty}");
    }
}
