//! Content-addressed unification of near-identical guest trees: the index, the store, the
//! linker, the marker policy and the host-root layout behind `cowherd`.
#![warn(missing_docs)]

mod error;
mod open;
mod progress;
mod recover;
mod root;

mod guests;
mod pipeline;
mod storage;
mod system;

// The modules by their own names, crate-wide (`crate::store`, `crate::fsx`…): the folders
// group them by concern; the paths inside the crate do not spell the folder.
use guests::{create, fold, guest, lifecycle, manifest, memory, overlay, snapshot};
use pipeline::{candidates, hash, plan, policy, release, replace, report, scan, unify};
use storage::{index, key, maintain, reindex, store, verify};
use system::{fsx, mountinfo, sys};

pub use create::{
    CloneMode, CloneReport, NewGuest, TEMPLATE_REMOVING, TEMPLATE_STAGING, Tree, clone_tree,
    remove_below_root, rename_below_root,
};
pub use error::{Error, Result};
pub use fold::{FoldAction, FoldEntry, FoldOptions, FoldReport, fold};
pub use guest::{
    GuestPaths, GuestRecord, Origin, OriginKind, adopt, ensure_offline, guest_names, guest_record,
    validate_guest_name,
};
pub use lifecycle::{DestroyReport, ExportReport, SplitReport, destroy, export, split};
pub use maintain::{
    AlreadyStored, GcReport, GuestStats, Stats, TopObject, Totals, already_stored, gc, stats,
    store_mark,
};
pub use manifest::{
    ChangeKind, DISCARDED_DIR, GuestChange, LINKDEST_DIR, Layer, MANIFEST_FILE, OverlayMetadata,
    TreeManifest, changed_by_both, discard_guest_changes, guest_changes, keep_guest_changes,
    load_manifest,
};
pub use memory::{MemoryObject, MemoryStats, memory_stats};
pub use mountinfo::{MountEntry, parse_mountinfo, read_mountinfo};
pub use overlay::{
    Holder, MountOutcome, MountState, OVERLAY_OPTIONS, OverlayLayers, UmountOutcome, mount,
    mount_state, mount_states, mounted_rootfs, private_overlay, systemd_unit, umount,
};
pub use policy::{
    DEFAULT_POLICY_TOML, Marker, Policy, PolicyError, PolicyFile, Rule, load_policy_file,
    parse_conffiles, read_dpkg_conffiles,
};
pub use progress::{NoProgress, Phase, Progress};
pub use reindex::{RebuildReport, rebuild_index};
pub use report::{Failure, FlaggedPath, LinkedPath, UnifyReport, display_path};
pub use root::{Access, DEFAULT_ROOT, HostRoot};
pub use snapshot::{
    ATTEMPT_FILE, RollbackReport, SNAPSHOTS_DIR, SnapshotInfo, SnapshotRecord, SnapshotReport,
    abandon_attempt, attempt_in_flight, begin_attempt, keep_attempt, remove_snapshot, rollback,
    snapshot, snapshot_records, snapshot_usage, snapshots, utc_stamp, validate_snapshot_name,
};
pub use sys::{bound_malloc_arenas, close_on_exec_above_stderr};
pub use unify::{TreeSpec, UnifyOptions, forget_tree, unify, unify_tree};
pub use verify::{Problem, VerifyOptions, VerifyReport, verify};
