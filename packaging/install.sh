#!/usr/bin/env bash
# Installs outboxd for the current user as a systemd user service:
#
#   ~/.local/bin/outboxd                       the binary (replaced on every run)
#   ~/.config/systemd/user/outboxd.service     the unit (replaced on every run)
#   ~/.config/outboxd/config.toml              the example config, if absent
#   ~/.config/outboxd/token                    the token from stdin, if absent
#
# then enables and starts the service (or restarts it when it already runs).
# ~/.config stands for $XDG_CONFIG_HOME when that is set.
#
# The token is read from stdin, never from the command line, where other users
# could see it in the process list:
#
#   packaging/install.sh --server-url https://uploads.example.com/upload < token.txt
#
# Run it again to upgrade: the config and the token file are kept.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: packaging/install.sh [--binary PATH] [--server-url URL] [--no-start]

Installs outboxd as a systemd user service for the current user.

  --binary PATH      outboxd binary to install [default: target/release/outboxd]
  --server-url URL   server_url to write into a new config file
  --no-start         install the files only; do not call systemctl

When ~/.config/outboxd/token does not exist, the token is read from stdin
(one line; a prompt appears when stdin is a terminal).
EOF
}

fail() {
  echo "install.sh: error: $*" >&2
  exit 1
}

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
binary="$repo_dir/target/release/outboxd"
server_url=""
start=yes

while [ $# -gt 0 ]; do
  case "$1" in
    --binary)
      [ $# -ge 2 ] || fail "--binary needs a path"
      binary="$2"
      shift 2
      ;;
    --server-url)
      [ $# -ge 2 ] || fail "--server-url needs a URL"
      server_url="$2"
      shift 2
      ;;
    --no-start)
      start=no
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
done

[ -n "${HOME:-}" ] || fail "HOME is not set"
if [[ "${XDG_CONFIG_HOME:-}" == /* ]]; then
  config_home="$XDG_CONFIG_HOME"
else
  config_home="$HOME/.config"
fi
bin_dir="$HOME/.local/bin"
unit_dir="$config_home/systemd/user"
app_dir="$config_home/outboxd"
config_file="$app_dir/config.toml"
token_file="$app_dir/token"
unit_source="$repo_dir/packaging/systemd/outboxd.service"
config_source="$repo_dir/packaging/config.example.toml"

# Check every input before anything is written, so that a failed run leaves
# nothing half installed.
[ -x "$binary" ] || fail "$binary is not an executable file; build it with 'cargo build --release' or pass --binary PATH"
[ -f "$unit_source" ] || fail "$unit_source is missing; run this script from an outboxd source checkout"
[ -f "$config_source" ] || fail "$config_source is missing; run this script from an outboxd source checkout"
if [ -n "$server_url" ]; then
  [[ "$server_url" =~ ^https?://[^[:space:]\"\\]+$ ]] ||
    fail "--server-url '$server_url' is invalid: use an http:// or https:// URL without spaces, quotes or backslashes"
fi

token=""
if [ ! -e "$token_file" ]; then
  if [ -t 0 ]; then
    printf 'Paste the upload token for outboxd, then press Enter: ' >&2
    IFS= read -rs token || true
    echo >&2
  else
    IFS= read -r token || true
  fi
  # Trim surrounding whitespace. outboxd itself checks the rest of the format.
  token="${token#"${token%%[![:space:]]*}"}"
  token="${token%"${token##*[![:space:]]}"}"
  [ -n "$token" ] || fail "no token on stdin and $token_file does not exist; pipe the token in: packaging/install.sh < token.txt"
fi

umask 077
mkdir -p "$bin_dir" "$unit_dir" "$app_dir"
chmod 0700 "$app_dir"

# Copy, then rename over the old binary: writing into a running executable
# fails with "Text file busy".
install -m 0755 "$binary" "$bin_dir/outboxd.new"
mv -f "$bin_dir/outboxd.new" "$bin_dir/outboxd"
echo "installed $bin_dir/outboxd"

sed 's|^ExecStart=.*|ExecStart=%h/.local/bin/outboxd run|' "$unit_source" >"$unit_dir/outboxd.service.new"
chmod 0644 "$unit_dir/outboxd.service.new"
mv -f "$unit_dir/outboxd.service.new" "$unit_dir/outboxd.service"
echo "installed $unit_dir/outboxd.service"

if [ -e "$config_file" ]; then
  echo "kept the existing $config_file"
  if [ -n "$server_url" ]; then
    echo "note: --server-url was not written because $config_file exists; edit server_url there" >&2
  fi
else
  if [ -n "$server_url" ]; then
    # Escape the characters that are special in a sed replacement.
    replacement="${server_url//&/\\&}"
    replacement="${replacement//|/\\|}"
    sed "s|^# server_url = .*|server_url = \"$replacement\"|" "$config_source" >"$config_file"
  else
    cp "$config_source" "$config_file"
    echo "note: server_url is not set, so uploads stay on hold until you set it in $config_file" >&2
  fi
  chmod 0600 "$config_file"
  echo "installed $config_file"
fi

if [ -n "$token" ]; then
  # printf is a shell builtin, so the token never appears in a process's argv.
  printf '%s\n' "$token" >"$token_file.new"
  chmod 0600 "$token_file.new"
  mv -f "$token_file.new" "$token_file"
  echo "wrote $token_file (mode 0600)"
else
  echo "kept the existing $token_file"
  if [ -n "$(find "$token_file" -maxdepth 0 -perm /077 2>/dev/null)" ]; then
    echo "warning: $token_file can be read by other users; run: chmod 600 $token_file" >&2
  fi
fi

if [ "$start" = yes ]; then
  systemctl --user daemon-reload ||
    fail "systemctl --user failed: this session has no systemd user instance; log in as this user directly (not through su or sudo) and run the script again"
  if systemctl --user is-active --quiet outboxd; then
    systemctl --user enable outboxd
    systemctl --user restart outboxd
    echo "restarted outboxd"
  else
    systemctl --user enable --now outboxd
    echo "enabled and started outboxd"
  fi
fi

user="$(id -un)"
if [ ! -e "/var/lib/systemd/linger/$user" ]; then
  cat <<EOF

Note: lingering is off for $user, so outboxd runs only while $user is logged
in. On a machine where nobody logs in, enable it once:

    sudo loginctl enable-linger $user
EOF
fi

case ":$PATH:" in
  *":$bin_dir:"*) ;;
  *) echo "note: $bin_dir is not in PATH; add it to run 'outboxd status' without the full path" >&2 ;;
esac

cat <<EOF

Next steps:
    outboxd status                       the daemon's state
    journalctl --user -u outboxd -f      its log
    systemctl --user reload outboxd      read the config again after an edit
    systemctl --user restart outboxd     use a new token
EOF
