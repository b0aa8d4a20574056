//! Preloading templates: space check, resume after interruption, verification, no-op.
#![allow(clippy::unwrap_used)]

mod provision_support;

use std::ops::ControlFlow;
use std::sync::Arc;

use provision_support::{make_template, require_qemu_img, Fault, Faulty};
use unacloud_core::hypervisor::Hypervisor;
use unacloud_core::model::{DiskFormat, DiskSpace, DiskType};
use unacloud_core::provision::catalog::{Catalog, NewTemplate, TemplateVersion};
use unacloud_core::provision::preload::{partial_path, preload, PreloadOutcome};
use unacloud_core::qemu::QemuHypervisor;
use unacloud_core::Error;

async fn setup(
    dir: &std::path::Path,
) -> (std::path::PathBuf, TemplateVersion, Arc<QemuHypervisor>) {
    require_qemu_img();
    let src = make_template(dir, "src", 64 << 20, 9 << 20).await;
    let mut c = Catalog::open(dir.join("catalog.json")).unwrap();
    let v = c
        .add_draft(NewTemplate::new("ubuntu", "Linux", DiskFormat::Qcow2, &src))
        .unwrap();
    let t = c.get("ubuntu", v).unwrap().clone();
    let hv = Arc::new(QemuHypervisor::open(dir.join("host")).await.unwrap());
    (src, t, hv)
}

/// Preloads `t` from `src` into `store` without interrupting it.
async fn preload_all(
    hv: &dyn Hypervisor,
    t: &TemplateVersion,
    src: &std::path::Path,
    store: &std::path::Path,
) -> unacloud_core::Result<PreloadOutcome> {
    preload(hv, t, src, store, &mut |_| ControlFlow::Continue(())).await
}

#[tokio::test]
async fn interrupted_copy_resumes_and_registers_multiattach() {
    let dir = tempfile::tempdir().unwrap();
    let (src, t, hv) = setup(dir.path()).await;
    let store = dir.path().join("host/templates");

    // Interrupt after the second chunk.
    let mut chunks = 0;
    let r = preload(hv.as_ref(), &t, &src, &store, &mut |_| {
        chunks += 1;
        if chunks == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await;
    assert!(matches!(r, Err(Error::Cancelled { .. })), "{r:?}");
    let partial = partial_path(&std::fs::canonicalize(&store).unwrap(), &t);
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0 && kept < t.size_bytes, "kept {kept}");
    assert!(
        !store.join(&t.file_name).exists(),
        "no half file under the final name"
    );
    assert!(hv.list_disks().await.unwrap().is_empty());

    // Resume: continues from the partial length, verifies, renames, registers.
    let mut first = None;
    let out = preload(hv.as_ref(), &t, &src, &store, &mut |p| {
        first.get_or_insert(*p);
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    let p = first.unwrap();
    assert_eq!(p.resumed_from, kept);
    match &out {
        PreloadOutcome::Copied {
            bytes_copied,
            resumed_from,
            disk,
        } => {
            assert_eq!(*resumed_from, kept);
            assert_eq!(*bytes_copied, t.size_bytes - kept);
            assert_eq!(disk.disk_type, DiskType::MultiAttach);
        }
        other => panic!("expected Copied, got {other:?}"),
    }
    assert!(!partial.exists());
    assert_eq!(
        std::fs::read(store.join(&t.file_name)).unwrap(),
        std::fs::read(&src).unwrap()
    );
    // The registered template really is usable by qemu-img.
    let chain = hv
        .qemu_img()
        .info_chain(&store.join(&t.file_name))
        .await
        .unwrap();
    assert_eq!(chain[0].format, "qcow2");

    // Again: nothing to do.
    let mut calls = 0;
    let again = preload(hv.as_ref(), &t, &src, &store, &mut |_| {
        calls += 1;
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert!(matches!(again, PreloadOutcome::AlreadyPresent { .. }));
    assert_eq!(calls, 0);
    assert_eq!(hv.list_disks().await.unwrap().len(), 1);
}

#[tokio::test]
async fn not_enough_space_is_reported_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, t, hv) = setup(dir.path()).await;
    let faulty = Faulty::new(hv.clone());
    *faulty.space.lock().unwrap() = Some(DiskSpace {
        available: 4096,
        total: 1 << 40,
    });
    let store = dir.path().join("host/templates");
    match preload_all(&faulty, &t, &src, &store).await {
        Err(e @ Error::InsufficientSpace { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("needs {} bytes, has 4096", t.size_bytes)),
                "{msg}"
            );
        }
        other => panic!("expected InsufficientSpace, got {other:?}"),
    }
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0);
}

#[tokio::test]
async fn a_corrupted_copy_is_rejected_and_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let (src, t, hv) = setup(dir.path()).await;
    let store = dir.path().join("host/templates");
    std::fs::create_dir_all(&store).unwrap();
    // A partial file whose bytes are not a prefix of the template.
    let partial = partial_path(&std::fs::canonicalize(&store).unwrap(), &t);
    std::fs::write(&partial, vec![0xffu8; 1 << 20]).unwrap();
    match preload_all(hv.as_ref(), &t, &src, &store).await {
        Err(Error::ChecksumMismatch { .. }) => {}
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(
        !partial.exists(),
        "a copy that failed verification is discarded"
    );
    assert!(!store.join(&t.file_name).exists());
    // The next attempt starts over and succeeds.
    preload_all(hv.as_ref(), &t, &src, &store).await.unwrap();

    // A tampered file under the final name is reported, never silently replaced.
    let final_path = store.join(&t.file_name);
    let mut other = t.clone();
    other.checksum = "blake3:0000000000000000000000000000000000000000000000000000000000000000"
        .parse()
        .unwrap();
    match preload_all(hv.as_ref(), &other, &src, &store).await {
        Err(e @ Error::ChecksumMismatch { .. }) => {
            assert!(e.to_string().contains("remove the file"))
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(final_path.exists());
}

#[tokio::test]
async fn failing_registration_leaves_no_registered_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (src, t, hv) = setup(dir.path()).await;
    let faulty = Faulty::new(hv.clone());
    faulty.inject("set_disk_type", 0, Fault::Fail, 1);
    let store = dir.path().join("host/templates");
    assert!(preload_all(&faulty, &t, &src, &store).await.is_err());
    assert!(hv.list_disks().await.unwrap().is_empty());
    // The verified file stays; the next call only registers it.
    let out = preload_all(&faulty, &t, &src, &store).await.unwrap();
    assert!(matches!(out, PreloadOutcome::Registered { .. }), "{out:?}");
}
