#!/usr/bin/env bash
# Prove the container's read-only claims without a Docker engine.
#
#   scripts/check_readonly.sh      (as root, with the venv that holds conus active; CI does this)
#
# Runs conus as the unprivileged user `nobody` the way the image runs it: HOME=/nonexistent,
# the environment variables of the Dockerfile's ENV lines (their /tmp paths moved into a private
# scratch folder), the install tree (clone, venv, interpreter) root-owned and not writable.
# The workload is `conus demo` once bids_app.demo exists; until then a BIDS validation + dry run
# and a participant-level run on a tiny fixture dataset (with the tests' threshold segmenter in
# place of the shipped model), then the group level.
#
# Every file-system call that writes or tries to write (open for writing, mkdir, rename, unlink,
# chmod...) is traced with strace; the check fails if any of them, successful or not, touches a
# path outside the output folder, the scratch tmp folder and /dev/{null,shm,tty,pts}. Without
# strace it falls back to "conus succeeds as nobody and prints no permission warning".
#
# When the interpreter or the clone lives under a folder `nobody` cannot enter (CI clones under
# /root, pyenv interpreters in /root/.pyenv), the script re-executes itself in a private mount
# namespace (unshare -m) where each such folder is covered by a tmpfs (mode 0711) holding bind
# mounts of its entries: nothing is copied and no permission changes on the real file system.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "check_readonly: FAIL: $*" >&2; exit 1; }
say() { echo "check_readonly: $*"; }

[[ "$(id -u)" == 0 ]] || die "must run as root (it switches to the user nobody with runuser)"
command -v runuser >/dev/null || die "runuser not found"
py="$(command -v python)" || die "no python on PATH: activate the venv that holds conus"
venv="$("$py" -c 'import sys; print(sys.prefix)')"
interp="$(readlink -f "$py")"
user=nobody

# Folders on the way to the interpreter, the venv and the clone that nobody cannot enter,
# outermost first.
blocked_dirs() {
    local p d
    for p in "$interp" "$venv/bin/python" "$repo/bids_app"; do
        d="$(dirname "$(readlink -f "$p")")"
        while [[ "$d" != "/" ]]; do
            runuser -u "$user" -- test -x "$d" || echo "$d"
            d="$(dirname "$d")"
        done
    done | sort -u | awk '{ print length($0) "\t" $0 }' | sort -n | cut -f2-
}

# Cover a folder with a tmpfs (mode 0711) holding bind mounts of all its entries.
open_dir() {
    local dir="$1" stash e name
    stash="$(mktemp -d)"
    mount --bind "$dir" "$stash" || return 1
    mount -t tmpfs -o mode=0711 tmpfs "$dir" || return 1
    for e in "$stash"/* "$stash"/.[!.]* "$stash"/..?*; do
        [[ -e "$e" || -L "$e" ]] || continue
        name="${e##*/}"
        if [[ -L "$e" ]]; then cp -P "$e" "$dir/$name" || return 1
        elif [[ -d "$e" ]]; then mkdir "$dir/$name" && mount --bind "$e" "$dir/$name" || return 1
        else : >"$dir/$name" && mount --bind "$e" "$dir/$name" || return 1
        fi
    done
}

if [[ "${1:-}" == "--in-namespace" ]]; then
    shift
    while IFS= read -r d; do
        [[ -n "$d" ]] || continue
        say "making $d enterable for $user inside a private mount namespace"
        open_dir "$d" || die "cannot bind-mount inside the namespace (no CAP_SYS_ADMIN?): run the check from" \
            "a clone and venv under world-readable folders instead"
    done < <(blocked_dirs)
elif [[ -n "$(blocked_dirs)" ]]; then
    command -v unshare >/dev/null || die "$(blocked_dirs | head -1) is closed to $user and unshare is missing"
    exec unshare --mount --propagation private -- bash "$0" --in-namespace "$@"
fi

runuser -u "$user" -- "$py" -c 'import bids_app' \
    || die "$user cannot import bids_app with $py (are the venv and the clone world-readable?)"

# The install tree must not be writable by the unprivileged user.
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for d in "$repo" "$repo/bids_app" "$repo/models" "$venv" "$site" "$(dirname "$interp")"; do
    [[ -e "$d" ]] || continue
    if runuser -u "$user" -- test -w "$d"; then die "$d is writable by $user"; fi
done

scratch="$(mktemp -d /tmp/conus-readonly.XXXXXX)"
chmod 0755 "$scratch"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/tmp" "$scratch/out" "$scratch/trace" "$scratch/data"
chown "$user" "$scratch/tmp" "$scratch/out" "$scratch/trace"

# The image's environment: the Dockerfile's ENV pairs (${CONUS_VERSION} expanded, /tmp moved to
# the scratch folder, /opt/conus, the image's copy of the repository, mapped to this clone),
# HOME pointing nowhere (nothing may need a home directory).
mapfile -t image_env < <("$py" - "$repo/Dockerfile" "$scratch/tmp" "$repo" <<'PYEOF'
import re
import shlex
import sys

import bids_app

text = open(sys.argv[1], encoding="utf-8").read().replace("\\\n", " ")
for line in text.splitlines():
    if re.match(r"^\s*ENV\s", line):
        for word in shlex.split(line.split(None, 1)[1], comments=True):
            key, _, value = word.partition("=")
            value = value.replace("${CONUS_VERSION}", bids_app.__version__)
            if value == "/tmp" or value.startswith("/tmp/"):
                value = sys.argv[2] + value[4:]
            elif value == "/opt/conus" or value.startswith("/opt/conus/"):
                value = sys.argv[3] + value[10:]
            print(f"{key}={value}")
PYEOF
)
[[ "${#image_env[@]}" -gt 0 ]] || die "no ENV lines found in $repo/Dockerfile"
run_env=(env -i "PATH=$venv/bin:/usr/local/bin:/usr/bin:/bin" "LANG=C.UTF-8" "${image_env[@]}"
         "HOME=/nonexistent" "TMPDIR=$scratch/tmp")

tracer=()
if command -v strace >/dev/null; then
    tracer=(strace -f -qq -y -s 4096 -o "$scratch/trace/strace.log" -e
            "trace=open,openat,openat2,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,unlink,unlinkat,rmdir,truncate,chmod,fchmodat,chown,lchown,fchownat,mknod,mknodat,utime,utimes,utimensat")
else
    say "WARNING: strace not found; only checking that conus succeeds as $user without warnings"
fi

# Run one command as nobody, in the image's environment, traced; keep its output.
as_nobody() {
    local log="$scratch/trace/console.log"
    say "as $user: $*"
    (cd "$scratch/tmp" && runuser -u "$user" -- "${run_env[@]}" "${tracer[@]}" "$@") \
        >>"$log" 2>&1 || { cat "$log" >&2; die "'$*' failed as $user (output above)"; }
    if [[ "${#tracer[@]}" -gt 0 ]]; then cat "$scratch/trace/strace.log" >>"$scratch/trace/all.log"; fi
}

if "$py" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("bids_app.demo") is None)'; then
    out="$scratch/out/demo"
    as_nobody conus demo "$out"
else
    say "bids_app.demo not available yet: participant + group level on a tiny fixture dataset"
    bids="$scratch/data/bids"
    out="$scratch/out/conus"
    "$py" - "$bids" "$repo/tests" <<'PYEOF'
import sys
from pathlib import Path

sys.path.insert(0, sys.argv[2])
from fixtures import simple_dataset  # noqa: E402

simple_dataset(Path(sys.argv[1]), subjects=("01", "02"))
PYEOF
    cat >"$scratch/participant.py" <<PYEOF
import sys
sys.path.insert(0, "$repo/tests")
from fixtures import threshold_segmenter
from bids_app import pipeline
real = pipeline.run_participant_level
pipeline.run_participant_level = lambda cfg, segment_fn=None, runs=None: real(cfg, threshold_segmenter, runs)
from bids_app.cli import main
raise SystemExit(main())
PYEOF
    chmod -R a+rX "$scratch/data" "$scratch/participant.py"
    as_nobody conus "$bids" "$out" participant --dry-run
    as_nobody "$py" "$scratch/participant.py" "$bids" "$out" participant --skip_bids_validator
    as_nobody conus "$bids" "$out" group
fi

if grep -Eiq "permission denied|read-only file system|not a writable directory|could not be created" \
        "$scratch/trace/console.log"; then
    cat "$scratch/trace/console.log" >&2
    die "a permission warning was printed as $user (output above)"
fi

# The derivatives record the same version and image as the Dockerfile's ENV.
"$py" - "$out" <<'PYEOF' || die "dataset_description.json does not record the version and image"
import json
import sys
from pathlib import Path

import bids_app

out = Path(sys.argv[1])
descs = [json.loads(p.read_text()) for p in sorted(out.rglob("dataset_description.json"))]
generated = [g for d in descs for g in d.get("GeneratedBy", []) if g.get("Name") == "conus"]
assert generated, f"no conus dataset_description.json under {out}"
for g in generated:
    assert g["Version"] == bids_app.__version__, g
    assert g["Container"]["Tag"] == f"conus:{bids_app.__version__}", g
print(f"check_readonly: dataset_description.json: conus {bids_app.__version__}, "
      f"image {generated[0]['Container']['Tag']}")
PYEOF

if [[ "${#tracer[@]}" -gt 0 ]]; then
    "$py" - "$scratch/trace/all.log" "$scratch/out" "$scratch/tmp" <<'PYEOF' \
        || die "something wrote or tried to write outside the output and tmp folders"
"""Fail on any traced write (or write attempt) outside the allowed folders."""
import os
import re
import sys

log, *allowed = sys.argv[1:]
allowed = [os.path.realpath(a) for a in allowed]
devices = ["/dev/null", "/dev/shm", "/dev/tty", "/dev/pts", "/dev/urandom", "/dev/random"]
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
call_re = re.compile(r"^(?:\d+\s+)?(\w+)\((.*)")
arg_re = re.compile(r'(?:(AT_FDCWD|\d+)(?:<([^>]*)>)?, )?"((?:[^"\\]|\\.)*)"')


# threads naming themselves (TensorFlow, OpenMP) write their own /proc/self/task/<tid>/comm
proc_comm = re.compile(r"^/proc/(self|\d+)/task/\d+/comm$")


def inside(path):
    if proc_comm.match(path):
        return True
    return any(path == a or path.startswith(a.rstrip("/") + "/") for a in allowed + devices)


bad, calls = [], 0
for line in open(log, encoding="utf-8", errors="replace"):
    m = call_re.match(line)
    if not m or "resumed>" in line:
        continue
    name, args = m.groups()
    if name in ("open", "openat", "openat2") and not any(f in args for f in WRITE_FLAGS):
        continue
    calls += 1
    paths = arg_re.findall(args)
    if name in ("symlink", "symlinkat", "link", "linkat"):
        paths = paths[-1:]   # the link created; the target is not written
    for _dirfd, dirpath, path in paths:
        if not os.path.isabs(path):
            path = os.path.join(dirpath or allowed[-1], path)
        if not inside(os.path.normpath(path)):
            bad.append(line.strip())
            break
if bad:
    print(f"{len(bad)} write(s) outside the output and tmp folders:", *bad[:40], sep="\n  ")
    sys.exit(1)
print(f"check_readonly: strace: {calls} write calls, none outside the output and tmp folders")
PYEOF
fi

find "$out" -type f | sed "s|^$out/||" | sort | head -n 40
say "OK: conus runs as $user with HOME=/nonexistent and writes only to its output and tmp folders"
