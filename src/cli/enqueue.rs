//! `outboxd enqueue`: places zip archives into the outbox so that the daemon
//! never reads a partly written or incomplete file.
//!
//! Each file is checked first (a complete zip whose name matches `include`),
//! then written into the outbox under a dot name that `include` never matches,
//! flushed to disk, and renamed to its final name with `RENAME_NOREPLACE`, so
//! that a file already there is never replaced. The outbox folder is flushed
//! last, so that the new name survives a crash.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::Locate;
use crate::intake::IncludeMatcher;
use crate::zipfile;

/// Size of the smallest zip archive: an empty one is only its end of central
/// directory record.
const MIN_ZIP_BYTES: u64 = 22;

/// Target folder and options of the placement.
struct Placement<'a> {
    outbox: &'a Path,
    include_glob: &'a str,
    include: &'a IncludeMatcher,
    move_source: bool,
}

/// `outboxd enqueue`. Returns 0 when every file was placed, 1 when at least
/// one was not, 2 when the configuration cannot be used.
pub fn enqueue(
    locate: &Locate,
    outbox: Option<PathBuf>,
    move_files: bool,
    files: &[PathBuf],
) -> i32 {
    let loaded = locate.load(outbox);
    // Only a config file that cannot be read or parsed matters here, because
    // the outbox and the include glob may come from it. Other faults, such as a
    // missing server_url, concern the daemon and do not stop producers.
    if let Some(problem) = loaded
        .problems
        .iter()
        .find(|p| p.starts_with("config file "))
    {
        eprintln!("error: {problem}");
        return 2;
    }
    let settings = loaded.settings;
    let include = match IncludeMatcher::new(&settings.include) {
        Ok(matcher) => matcher,
        Err(err) => {
            eprintln!(
                "error: include = {:?} is not a valid glob: {err}; fix it in the config file or OUTBOXD_INCLUDE",
                settings.include
            );
            return 2;
        }
    };
    let placement = Placement {
        outbox: &settings.outbox,
        include_glob: &settings.include,
        include: &include,
        move_source: move_files,
    };
    let mut failed = 0;
    for file in files {
        match place(file, &placement) {
            Ok(target) if move_files => {
                println!("moved {} to {}", file.display(), target.display())
            }
            Ok(target) => println!("copied {} to {}", file.display(), target.display()),
            Err(message) => {
                eprintln!("error: {message}");
                failed += 1;
            }
        }
    }
    if failed == 0 {
        return 0;
    }
    if files.len() > 1 {
        eprintln!("error: {failed} of {} files were not enqueued", files.len());
    }
    1
}

/// Places one file and returns its path in the outbox. The error names the
/// file, what failed and what to do.
fn place(source: &Path, placement: &Placement) -> Result<PathBuf, String> {
    let shown = source.display();
    let name = source
        .file_name()
        .ok_or_else(|| format!("{shown} does not name a file; give the path of a zip archive"))?;
    let Some(text) = name.to_str() else {
        return Err(format!(
            "the name of {shown} is not valid UTF-8, which the daemon rejects; rename the file"
        ));
    };
    if text.starts_with('.') {
        return Err(format!(
            "{shown}: names that start with a dot are never uploaded; rename the file"
        ));
    }
    // Checked before the name rule, so that a folder gets no advice to rename
    // itself, and before opening, because opening a fifo blocks.
    if let Ok(target) = fs::metadata(source) {
        if target.is_dir() {
            return Err(format!(
                "{shown} is a folder; give the path of a zip archive"
            ));
        }
        if !target.is_file() {
            return Err(format!(
                "{shown} is not a regular file (a fifo, socket or device); give the path of a zip archive"
            ));
        }
    }
    if !placement.include.is_match(name) {
        return Err(format!(
            "{shown}: the name does not match include = {:?}, so the daemon would ignore the file; rename it (for example to {text}.zip)",
            placement.include_glob
        ));
    }
    let link_metadata =
        fs::symlink_metadata(source).map_err(|err| format!("{shown} cannot be read: {err}"))?;
    if placement.move_source && link_metadata.file_type().is_symlink() {
        return Err(format!(
            "{shown} is a symbolic link, and --move would move the link rather than the archive; give the path of the archive itself, or enqueue without --move"
        ));
    }
    let mut file = File::open(source).map_err(|err| format!("{shown} cannot be opened: {err}"))?;
    let before = file
        .metadata()
        .map_err(|err| format!("{shown} cannot be read: {err}"))?;
    if !before.is_file() {
        return Err(format!(
            "{shown} is not a regular file; give the path of a zip archive"
        ));
    }
    // No zip archive is shorter than its 22-byte end record, so a shorter file
    // gets a plainer message than the zip check would give.
    if before.len() < MIN_ZIP_BYTES {
        return Err(format!(
            "{shown} was not enqueued: it has {} bytes, and no zip archive is shorter than {MIN_ZIP_BYTES} bytes",
            before.len()
        ));
    }
    zipfile::check_complete(&mut file, before.len())
        .map_err(|err| format!("{shown} was not enqueued: {err}; only complete zip archives are accepted, so if a program is still writing it, wait until it has finished"))?;

    ensure_outbox(placement.outbox)?;
    let target = placement.outbox.join(name);
    if let Ok(existing) = fs::symlink_metadata(&target) {
        return Err(collision(source, &before, &target, &existing));
    }

    // The name carries the pid, so a file already there is left over from an
    // enqueue that crashed, and no other process uses that name.
    let temp = TempFile {
        path: placement
            .outbox
            .join(format!(".{text}.enqueue-{}", std::process::id())),
        armed: true,
    };
    let _ = fs::remove_file(&temp.path);
    let linked = placement.move_source && link_into(source, &temp.path)?;
    if linked {
        File::open(&temp.path)
            .and_then(|f| f.sync_all())
            .map_err(|err| format!("flushing {} to disk failed: {err}", temp.path.display()))?;
    } else {
        copy_into(&mut file, &before, &temp.path, source)?;
    }
    match crate::intake::rename_no_replace(&temp.path, &target) {
        Ok(()) => temp.disarm(),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            let existing = fs::symlink_metadata(&target).ok();
            return Err(match existing {
                Some(existing) => collision(source, &before, &target, &existing),
                None => format!("{} appeared in the outbox while {shown} was copied; it was not replaced, so rename {shown} and enqueue it again", target.display()),
            });
        }
        Err(err) => {
            return Err(format!(
                "renaming {} to {} failed: {err}",
                temp.path.display(),
                target.display()
            ))
        }
    }
    sync_folder(placement.outbox).map_err(|err| {
        format!("{shown} is in the outbox as {}, but flushing the outbox folder failed: {err}, so a crash now could lose the new name", target.display())
    })?;
    if placement.move_source {
        fs::remove_file(source).map_err(|err| {
            format!("{shown} is in the outbox as {}, but removing the source failed: {err}; remove it by hand", target.display())
        })?;
        if let Some(folder) = source.parent() {
            let folder = if folder.as_os_str().is_empty() {
                Path::new(".")
            } else {
                folder
            };
            if let Err(err) = sync_folder(folder) {
                eprintln!(
                    "warning: flushing {} after removing {shown} failed: {err}",
                    folder.display()
                );
            }
        }
    }
    Ok(target)
}

/// Builds the message for a target name that is taken in the outbox.
fn collision(
    source: &Path,
    source_metadata: &Metadata,
    target: &Path,
    existing: &Metadata,
) -> String {
    let shown = source.display();
    if existing.dev() == source_metadata.dev() && existing.ino() == source_metadata.ino() {
        return format!(
            "{shown} is already in the outbox as {}; the daemon uploads it from there",
            target.display()
        );
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let example = match name.rsplit_once('.') {
        Some((stem, extension)) if !stem.is_empty() => format!("{stem}-2.{extension}"),
        _ => format!("{name}-2"),
    };
    format!(
        "the outbox already has a file named {name} ({}), which was not replaced; rename {shown} (for example to {example}) and enqueue it again",
        target.display()
    )
}

/// Creates the outbox (mode 0700, like the daemon) when it is missing.
fn ensure_outbox(outbox: &Path) -> Result<(), String> {
    match fs::metadata(outbox) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => Err(format!(
            "the outbox {} is not a folder; fix outbox in the config file, OUTBOXD_OUTBOX or --outbox",
            outbox.display()
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(outbox).map_err(|err| {
                format!("the outbox {} does not exist and cannot be created: {err}; create it or choose another with --outbox", outbox.display())
            })
        }
        Err(err) => Err(format!("the outbox {} cannot be read: {err}", outbox.display())),
    }
}

/// Hard-links the source to the temporary name, which moves it without a copy
/// when both are on one filesystem. The source stays until the link has its
/// final name, so a crash or a name collision leaves it in place. Returns false
/// when the filesystem cannot link it (another filesystem, no hard links, or
/// a file owned by another user), so that the caller copies instead.
fn link_into(source: &Path, temp: &Path) -> Result<bool, String> {
    match fs::hard_link(source, temp) {
        Ok(()) => Ok(true),
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::EXDEV | libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
            ) =>
        {
            Ok(false)
        }
        Err(err) => Err(format!(
            "linking {} into the outbox as {} failed: {err}",
            source.display(),
            temp.display()
        )),
    }
}

/// Copies `source` to a new file at `temp` (mode 0600, because the archives are
/// private recordings) and flushes it to disk. Fails when the source changed
/// during the copy.
fn copy_into(
    source: &mut File,
    before: &Metadata,
    temp: &Path,
    source_path: &Path,
) -> Result<(), String> {
    let shown = source_path.display();
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)
        .map_err(|err| {
            format!(
                "creating {} failed: {err}; check that the outbox is writable",
                temp.display()
            )
        })?;
    let copied = source
        .seek(SeekFrom::Start(0))
        .and_then(|_| io::copy(source, &mut out))
        .map_err(|err| format!("copying {shown} into the outbox failed: {err}"))?;
    out.sync_all()
        .map_err(|err| format!("flushing {} to disk failed: {err}", temp.display()))?;
    let after = source
        .metadata()
        .map_err(|err| format!("{shown} cannot be read: {err}"))?;
    let unchanged = copied == before.len()
        && after.len() == before.len()
        && after.mtime() == before.mtime()
        && after.mtime_nsec() == before.mtime_nsec();
    if !unchanged {
        return Err(format!(
            "{shown} changed while it was copied; enqueue it again once its writer has finished"
        ));
    }
    Ok(())
}

fn sync_folder(folder: &Path) -> io::Result<()> {
    File::open(folder)?.sync_all()
}

/// A temporary file in the outbox, removed on drop unless it was renamed.
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}
