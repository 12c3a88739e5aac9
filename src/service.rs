//! Checks of the installation as a systemd user service, for `outboxd check`.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

/// File name of the user unit.
pub const UNIT_NAME: &str = "outboxd.service";

/// Folder in which `loginctl enable-linger USER` creates a file named `USER`.
const LINGER_DIR: &str = "/var/lib/systemd/linger";

/// Folders, besides `$XDG_CONFIG_HOME/systemd/user`, from which the systemd
/// user manager loads units that a package or an administrator installed.
const SYSTEM_UNIT_DIRS: &[&str] = &[
    "/etc/systemd/user",
    "/usr/local/lib/systemd/user",
    "/usr/lib/systemd/user",
];

/// Returns a warning with the fix when the outboxd user unit is installed but
/// lingering is off for the current user. Without lingering, the user's systemd
/// instance, and outboxd with it, starts only at the user's first login and
/// stops at the last logout, so nothing is uploaded while the user is logged out.
pub fn linger_warning() -> Option<String> {
    let user = current_user()?;
    let units = unit_paths(|name| std::env::var(name).ok());
    linger_warning_for(&units, Path::new(LINGER_DIR), &user)
}

/// Paths at which the user unit can be installed, the user's own first.
fn unit_paths(env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let config_home = match env("XDG_CONFIG_HOME").filter(|dir| Path::new(dir).is_absolute()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => env("HOME")
            .filter(|home| !home.is_empty())
            .map(|home| Path::new(&home).join(".config")),
    };
    let mut paths: Vec<PathBuf> = config_home
        .into_iter()
        .map(|dir| dir.join("systemd/user").join(UNIT_NAME))
        .collect();
    paths.extend(
        SYSTEM_UNIT_DIRS
            .iter()
            .map(|dir| Path::new(dir).join(UNIT_NAME)),
    );
    paths
}

fn linger_warning_for(unit_paths: &[PathBuf], linger_dir: &Path, user: &str) -> Option<String> {
    let unit = unit_paths.iter().find(|path| path.is_file())?;
    match linger_dir.join(user).try_exists() {
        Ok(false) => {}
        // Lingering is on, or whether it is on cannot be read: no warning.
        Ok(true) | Err(_) => return None,
    }
    Some(format!(
        "the user unit {} is installed, but lingering is off for user {user}, so outboxd runs only \
         while {user} is logged in; run `sudo loginctl enable-linger {user}` to start it at boot \
         and keep it running after logout",
        unit.display()
    ))
}

/// Returns the name of the user that runs this process: the password database
/// entry of the real uid, else `$USER`.
fn current_user() -> Option<String> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    user_name_of(uid).or_else(|| std::env::var("USER").ok().filter(|name| !name.is_empty()))
}

fn user_name_of(uid: libc::uid_t) -> Option<String> {
    let mut buffer = vec![0 as libc::c_char; 4096];
    // SAFETY: `passwd` is a C struct of integers and pointers, for which all
    // zero bytes is a valid value.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut entry: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and `buffer`, into which
    // getpwuid_r stores the strings, is passed with its length.
    let status = unsafe {
        libc::getpwuid_r(
            uid,
            &mut passwd,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut entry,
        )
    };
    if status != 0 || entry.is_null() || passwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r succeeded, so `pw_name` points to a NUL-terminated
    // string inside `buffer`.
    let name = unsafe { CStr::from_ptr(passwd.pw_name) };
    name.to_str()
        .ok()
        .filter(|name| !name.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install_unit(dir: &Path) -> PathBuf {
        let path = dir.join("systemd/user").join(UNIT_NAME);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "[Service]\n").unwrap();
        path
    }

    #[test]
    fn no_warning_without_unit() {
        let config = tempfile::tempdir().unwrap();
        let linger = tempfile::tempdir().unwrap();
        let units = vec![config.path().join("systemd/user").join(UNIT_NAME)];
        assert_eq!(linger_warning_for(&units, linger.path(), "alice"), None);
    }

    #[test]
    fn warning_when_linger_off() {
        let config = tempfile::tempdir().unwrap();
        let linger = tempfile::tempdir().unwrap();
        let unit = install_unit(config.path());
        let units = vec![PathBuf::from("/nonexistent/outboxd.service"), unit.clone()];
        let warning = linger_warning_for(&units, linger.path(), "alice").unwrap();
        assert!(warning.contains(&unit.display().to_string()), "{warning}");
        assert!(
            warning.contains("lingering is off for user alice"),
            "{warning}"
        );
        assert!(
            warning.contains("loginctl enable-linger alice"),
            "{warning}"
        );
    }

    #[test]
    fn no_warning_when_linger_on() {
        let config = tempfile::tempdir().unwrap();
        let linger = tempfile::tempdir().unwrap();
        let unit = install_unit(config.path());
        std::fs::write(linger.path().join("alice"), "").unwrap();
        assert_eq!(linger_warning_for(&[unit], linger.path(), "alice"), None);
    }

    #[test]
    fn linger_of_other_user_does_not_count() {
        let config = tempfile::tempdir().unwrap();
        let linger = tempfile::tempdir().unwrap();
        let unit = install_unit(config.path());
        std::fs::write(linger.path().join("bob"), "").unwrap();
        assert!(linger_warning_for(&[unit], linger.path(), "alice").is_some());
    }

    #[test]
    fn unit_folder_is_not_a_unit() {
        let config = tempfile::tempdir().unwrap();
        let linger = tempfile::tempdir().unwrap();
        let path = config.path().join(UNIT_NAME);
        std::fs::create_dir(&path).unwrap();
        assert_eq!(linger_warning_for(&[path], linger.path(), "alice"), None);
    }

    #[test]
    fn unit_paths_follow_xdg_config_home() {
        let paths = unit_paths(|name| match name {
            "XDG_CONFIG_HOME" => Some("/home/alice/cfg".into()),
            "HOME" => Some("/home/alice".into()),
            _ => None,
        });
        assert_eq!(
            paths[0],
            PathBuf::from("/home/alice/cfg/systemd/user/outboxd.service")
        );
        assert!(paths.contains(&PathBuf::from("/usr/lib/systemd/user/outboxd.service")));
    }

    #[test]
    fn unit_paths_default_to_home_config() {
        let paths = unit_paths(|name| match name {
            "XDG_CONFIG_HOME" => Some("relative/cfg".into()),
            "HOME" => Some("/home/alice".into()),
            _ => None,
        });
        assert_eq!(
            paths[0],
            PathBuf::from("/home/alice/.config/systemd/user/outboxd.service")
        );
    }

    #[test]
    fn unit_paths_without_home() {
        let paths = unit_paths(|_| None);
        assert_eq!(paths.len(), SYSTEM_UNIT_DIRS.len());
    }

    #[test]
    fn current_user_is_known() {
        let user = current_user().unwrap();
        assert!(!user.is_empty());
        assert_eq!(user_name_of(0).as_deref(), Some("root"));
    }
}
