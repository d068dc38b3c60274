"""Run arm64 artifacts on an x86-64 host under qemu-user, so CI can check cross-compiled artifacts without a board.

prepare() builds, once, and caches (in $LLAMAC_CACHE/emulate or ~/.cache/llamac/emulate, keyed by versions):
- an aarch64 root filesystem with Python 3.11, from Debian's arm64 packages, downloaded with the host's apt-get into
  private state directories and unpacked with dpkg-deb, never run (nothing on the host is reconfigured);
- a site directory of aarch64 wheels (TVM, numpy, ...) installed by the host pip with --platform/--target;
- a staging directory that makes `import llamac` in the guest resolve to the llamac sources the host runs.
run_emulated() then runs `python3.11 -m llamac run ...` inside qemu-aarch64-static with TVM's runtime library only.

Standard library only: this module is part of the runtime and must not pull in the compiler.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from llamac.errors import InputError

QEMU = "qemu-aarch64-static"
PYTHON = "python3.11"
DEBIAN_SUITE = "bookworm"  # the Debian release whose python3.11 the guest runs (matches cp311 wheels)
# Bump when the way the cache is built changes, so old caches are not reused.
LAYOUT = 2

# Debian arm64 packages the guest needs; their dependencies are added (first alternative of each "a | b").
ROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "libgomp1")
# Dependencies a Python process never uses (package tooling, perl): skipped, and not followed further.
SKIP_PACKAGES = frozenset({"dpkg", "tar", "install-info", "debconf", "perl", "perl-base", "perl-modules-5.36",
                           "libperl5.36", "mime-support", "mailcap", "tzdata", "readline-common"})
# Unpacked files nobody reads in the guest.
PRUNE_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")

# aarch64 wheels for the guest. None = the version the host has installed (so guest and host agree), else latest.
WHEELS: dict[str, str | None] = {
    "apache-tvm": "0.27.0.post1", "apache-tvm-ffi": None, "typing_extensions": None, "numpy": None,
    "ml_dtypes": None, "sentencepiece": None, "click": None, "tqdm": None, "regex": None, "tokenizers": None,
}
# Wheel files the guest never loads: it runs TVM's runtime library only (TVM_USE_RUNTIME_LIB=1), like an edge device.
PRUNE_SITE = ("tvm/lib/libtvm_compiler.so", "bin")
# Cache builds (rootfs-*, site-*) that no prepare() has used for this long are deleted (old versions pile up).
STALE_DAYS = 30
# pip matches --platform tags exactly: list every manylinux tag a Debian 12 (glibc 2.36) aarch64 system accepts.
PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{m}_aarch64" for m in range(36, 16, -1)))
# llamac subpackages that live outside llamac/ in a checkout (pyproject package-dir mapping).
MAPPED_SUBPACKAGES = ("runtime", "export", "targets")


@dataclasses.dataclass(frozen=True)
class Env:
    """A prepared emulation environment: paths inside the cache, and how to run the guest Python."""

    qemu: str      # path of qemu-aarch64-static
    root: Path     # aarch64 root filesystem (qemu -L)
    site: Path     # aarch64 wheels
    stage: Path    # makes `import llamac` resolve to this checkout

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / PYTHON

    def command(self, args: Sequence[str]) -> list[str]:
        """argv that runs the guest Python with `args` (e.g. ["-c", "print(1)"]). -P: the current directory (or a
        script's) is not put first on sys.path, where a checkout's own llamac/ (lacking runtime/, export/) would
        shadow the staged package."""
        return [self.qemu, "-L", str(self.root), str(self.python), "-s", "-P", *args]

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Host environment minus what would leak host libraries into the guest, plus the guest's paths."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=f"{self.stage}{os.pathsep}{self.site}", PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1",
                   QEMU_LD_PREFIX=str(self.root))
        env.update(extra or {})
        return env


def cache_root() -> Path:
    base = os.environ.get("LLAMAC_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "llamac") / "emulate"


def prepare(cache_dir: str | Path | None = None, progress: bool = True) -> Env:
    """Make sure the guest rootfs, wheels and staging dir exist (building what is missing) and return them.

    Idempotent and safe to call from several processes at once (a file lock serialises builders)."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise InputError(f"{QEMU} not found; install it with `apt-get install qemu-user-static`")
    cache = Path(cache_dir) if cache_dir else cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    log = _Log(progress)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        root = _ensure(cache / f"rootfs-{DEBIAN_SUITE}-{PYTHON}-{_key(LAYOUT, ROOT_PACKAGES, sorted(SKIP_PACKAGES))}",
                       lambda d: _build_rootfs(d, cache, qemu, log), log, "aarch64 Python rootfs")
        specs = _wheel_specs()
        site = _ensure(cache / f"site-cp311-{_key(LAYOUT, specs, PLATFORMS, PRUNE_SITE)}",
                       lambda d: _install_wheels(d, specs, qemu, root, log), log, "aarch64 wheels")
        stage = _stage(cache)
        _forget_stale(cache, keep=(root, site))
    return Env(qemu=qemu, root=root, site=site, stage=stage)


def emulated_python(args: Sequence[str], env: Mapping[str, str] | None = None, *, cache_dir: str | Path | None = None,
                    timeout: float | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run the aarch64 Python with `args` under qemu; capture its output as text (for tests and scripts)."""
    e = prepare(cache_dir, progress=False)
    return subprocess.run(e.command(args), env=e.environ(env), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def run_emulated(art: str | Path, argv: Sequence[str]) -> int:
    """`llamac run` for an arm64 artifact: `argv` are the run arguments (without --emulate). Returns the exit code.

    The guest's stdout and stderr go straight to ours, so tokens stream as they are generated."""
    art = Path(art)
    check_artifact_arch(art)
    argv = [str(a) for a in argv]
    if not any(a == str(art) or _same_path(a, art) for a in argv):
        argv = [str(art), *argv]  # the artifact came from a default, not the command line: pass it explicitly
    e = prepare(progress=True)
    try:
        return subprocess.run(e.command(["-m", "llamac", "run", *argv]), env=e.environ()).returncode
    except KeyboardInterrupt:
        return 130


# --- the artifact's architecture -----------------------------------------------------------------------------------

def _manifest_target(art: Path) -> dict | None:
    try:
        manifest = json.loads((Path(art) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    target = manifest.get("target")
    return target if isinstance(target, dict) else manifest


def artifact_arch(art: Path) -> str | None:
    """"aarch64", "x86_64", "wasm32", ... from the artifact's manifest.json (target.arch, else a target triple);
    None if there is no manifest or it does not say."""
    target = _manifest_target(art)
    for text in _strings(target, ("arch", "mtriple", "triple", "host", "name")):
        arch = _normalise_arch(text)
        if arch:
            return arch
    return None


def check_artifact_arch(art: Path) -> None:
    """Refuse what qemu-aarch64 with a glibc Python cannot run: other architectures, and Android (bionic) builds.
    An artifact whose manifest does not say is let through (the guest runtime checks it again)."""
    if not Path(art).exists():
        raise InputError(f"{art}: no such artifact")
    if not (Path(art) / "manifest.json").is_file():
        raise InputError(f"{art} is not a compiled artifact: --emulate runs compiled aarch64 (arm64) artifacts "
                         f"(llamac compile --target arm64)")
    arch = artifact_arch(art)
    if arch is not None and arch != "aarch64":
        raise InputError(f"{art}: artifact is built for {arch}, --emulate runs aarch64 (arm64) artifacts; "
                         f"run it without --emulate")
    target = _manifest_target(art) or {}
    system = target.get("runtime_os") or target.get("os")
    if isinstance(system, str) and system.lower() not in ("linux", ""):
        raise InputError(f"{art}: artifact is built for {system} ({target.get('name', '?')}); --emulate runs "
                         f"Linux aarch64 (glibc) artifacts, such as --target arm64, rpi4 or rpi5")


def _strings(obj, keys: tuple[str, ...]) -> Iterable[str]:
    """String values under the given keys in nested dicts/lists, shallowest first, in the order of `keys`."""
    level = [obj]
    while level:
        dicts = [o for o in level if isinstance(o, dict)]
        for key in keys:
            for d in dicts:
                if isinstance(d.get(key), str):
                    yield d[key]
        children = [v for d in dicts for v in d.values()] + [x for o in level if isinstance(o, list) for x in o]
        level = [c for c in children if isinstance(c, (dict, list))]


def _normalise_arch(text: str) -> str | None:
    t = text.lower()
    if t.startswith(("aarch64", "arm64")) or t in ("arm64", "aarch64"):
        return "aarch64"
    if t.startswith(("x86_64", "x86-64", "amd64")):
        return "x86_64"
    if t.startswith(("wasm", "webgpu")):
        return "wasm32"
    if t.startswith(("armv7", "arm-", "armhf")):
        return "arm"
    return None


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).exists() and Path(a).resolve() == b.resolve()
    except OSError:
        return False


# --- building the cache --------------------------------------------------------------------------------------------

class _Log:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, msg: str) -> None:
        if self.on:
            print(f"llamac emulate: {msg}", file=sys.stderr, flush=True)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _ensure(final: Path, build, log: _Log, what: str) -> Path:
    """Return `final` if a complete build is there; else build into a temp dir beside it and rename it into place,
    so an interrupted build never leaves a half-made directory that looks finished."""
    if (final / ".complete").is_file():
        return final
    log(f"preparing {what} in {final} (once; cached afterwards)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps({"built": time.time()}))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{what} ready ({time.perf_counter() - t0:.0f} s)")
    return final


def _forget_stale(cache: Path, keep: tuple[Path, ...]) -> None:
    """Mark the builds in use; delete finished builds that nothing has used for STALE_DAYS (e.g. older versions)."""
    now = time.time()
    for d in keep:
        os.utime(d / ".complete", (now, now))
    for d in cache.iterdir():
        if d.name.startswith(("rootfs-", "site-")) and d not in keep and (d / ".complete").is_file():
            if now - (d / ".complete").stat().st_mtime > STALE_DAYS * 86400:
                shutil.rmtree(d, ignore_errors=True)


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None) -> str:
    """Run a host tool; on failure raise with the end of its output, which names the real problem."""
    try:
        p = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise InputError(f"{cmd[0]} not found: --emulate builds its arm64 rootfs with Debian's apt-get and dpkg-deb")
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        raise RuntimeError(f"{what} failed (exit {p.returncode}): {tail}")
    return p.stdout


# rootfs: Debian arm64 packages, unpacked -----------------------------------------------------------------------------

def _build_rootfs(root: Path, cache: Path, qemu: str, log: _Log) -> None:
    work = Path(tempfile.mkdtemp(prefix="apt-", dir=cache))
    try:
        apt = _private_apt(work)
        log(f"apt-get update (Debian {DEBIAN_SUITE}, arm64, private package lists)")
        _run(["apt-get", *apt, "update"], "apt-get update for arm64")
        names = _dependency_closure(apt, ROOT_PACKAGES)
        debs = work / "debs"
        debs.mkdir()
        log(f"downloading {len(names)} arm64 packages")
        _run(["apt-get", *apt, "download", *names], "apt-get download (arm64)", cwd=debs)
        files = sorted(debs.glob("*.deb"))
        log(f"unpacking {len(files)} packages ({sum(f.stat().st_size for f in files) / 1e6:.0f} MB)")
        for deb in files:
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for rel in PRUNE_DIRS:
        shutil.rmtree(root / rel, ignore_errors=True)
    if not (root / "usr" / "bin" / PYTHON).is_file():
        raise RuntimeError(f"the arm64 packages did not provide usr/bin/{PYTHON}")
    _compile_bytecode(root / "usr" / "lib" / PYTHON, root, qemu, log)


def _compile_bytecode(tree: Path, root: Path, qemu: str, log: _Log) -> None:
    """Write .pyc files once. Debian compiles its stdlib in postinst scripts, which we never run, and a guest under
    PYTHONDONTWRITEBYTECODE would otherwise recompile every module on every run (seconds under emulation)."""
    log("compiling .pyc files")
    if sys.version_info[:2] == (3, 11):  # the guest's bytecode version: the host does it natively, in seconds
        cmd = [sys.executable, "-m", "compileall", "-q", "-j", "0", str(tree)]
    else:
        cmd = [qemu, "-L", str(root), str(root / "usr" / "bin" / PYTHON), "-m", "compileall", "-q", str(tree)]
    # Exit status ignored: a few files that are meant not to compile (test data) make compileall report failure.
    subprocess.run(cmd, capture_output=True)


def _private_apt(work: Path) -> list[str]:
    """apt-get options that keep all state (lists, caches, sources, dpkg status) inside `work`, for arm64 only."""
    for d in ("lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d", "apt.conf.d"):
        (work / d).mkdir(parents=True, exist_ok=True)
    (work / "status").write_text("")  # an empty dpkg status: the host's installed packages are irrelevant
    (work / "sources.list").write_text(_sources_list())
    opts = {
        "APT::Architecture": "arm64", "APT::Architectures": "arm64",
        "Dir::State::Lists": work / "lists", "Dir::State::status": work / "status", "Dir::Cache": work / "cache",
        "Dir::Etc::SourceList": work / "sources.list", "Dir::Etc::SourceParts": work / "sources.list.d",
        "Dir::Etc::Preferences": work / "preferences", "Dir::Etc::PreferencesParts": work / "preferences.d",
        "Acquire::Languages": "none", "APT::Get::AllowUnauthenticated": "false",
    }
    if os.geteuid() == 0:
        opts["APT::Sandbox::User"] = "root"  # the private dirs may not be readable by the _apt user
    return ["-q", *[a for k, v in opts.items() for a in ("-o", f"{k}={v}")]]


def _sources_list() -> str:
    """Debian main (+ updates, security) for arm64, from the host's Debian mirrors where it names them."""
    main, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    for uri in _host_apt_uris():
        path = uri.rstrip("/")
        if path.endswith("/debian-security"):
            security = path
        elif path.endswith("/debian"):
            main = path
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    opt = f"[arch=arm64 signed-by={key}]" if Path(key).is_file() else "[arch=arm64]"
    return "".join(f"deb {opt} {uri} {suite} main\n" for uri, suite in (
        (main, DEBIAN_SUITE), (main, f"{DEBIAN_SUITE}-updates"), (security, f"{DEBIAN_SUITE}-security")))


def _host_apt_uris() -> list[str]:
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    uris = []
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("URIs:"):
                uris += line[5:].split()
            elif line.startswith("deb "):
                uris += [w for w in re.sub(r"\[.*?\]", "", line).split()[1:2]]
    return uris


def _dependency_closure(apt: list[str], roots: Iterable[str]) -> list[str]:
    """Packages needed by `roots`, following Depends/PreDepends (first alternative), minus SKIP_PACKAGES."""
    seen: set[str] = set()
    todo = [r for r in roots if r not in SKIP_PACKAGES]
    while todo:
        seen.update(todo)
        out = _run(["apt-cache", *apt, "depends", "--no-recommends", "--no-suggests", "--no-conflicts",
                    "--no-breaks", "--no-replaces", "--no-enhances", *todo], "apt-cache depends (arm64)")
        found = _parse_depends(out)
        todo = sorted(n for n in found if n not in seen and n not in SKIP_PACKAGES)
    return sorted(seen)


def _parse_depends(out: str) -> set[str]:
    """Dependency names from `apt-cache depends` output. An OR group lists members with a leading "|" except the
    last; we keep its first member. A virtual package "<name>" is replaced by its first provider (indented below)."""
    deps: set[str] = set()
    in_group = False
    virtual_pending = False
    for line in out.splitlines():
        if not line.startswith(" "):  # a package header
            in_group = virtual_pending = False
            continue
        m = re.match(r"^ ([ |])(PreDepends|Depends): (\S+)", line)
        if m:
            bar, name = m.group(1) == "|", m.group(3)
            take = not in_group
            in_group = bar  # the next line continues this OR group
            virtual_pending = take and name.startswith("<")
            if take and not virtual_pending:
                deps.add(name.split(":")[0])
            continue
        if virtual_pending and line.startswith("    "):
            deps.add(line.strip().split(":")[0])
            virtual_pending = False
    return deps


# wheels: aarch64 builds from PyPI, installed by the host pip --------------------------------------------------------

def _wheel_specs() -> list[str]:
    specs = []
    for name, pin in WHEELS.items():
        version = pin or _host_version(name)
        specs.append(f"{name}=={version}" if version else name)
    return specs


def _host_version(name: str) -> str | None:
    import importlib.metadata  # lazy: costs tens of ms, only needed when the wheel cache key is computed

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _install_wheels(site: Path, specs: list[str], qemu: str, root: Path, log: _Log) -> None:
    log(f"pip: {len(specs)} aarch64 wheels for CPython 3.11 ({', '.join(specs)})")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11", "--target", str(site),
           *[a for p in PLATFORMS for a in ("--platform", p)], *specs]
    _run(cmd, "pip install of the aarch64 wheels")
    for rel in PRUNE_SITE:
        p = site / rel
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    _compile_bytecode(site, root, qemu, log)  # pip already did if the host is 3.11; then this only checks


# staging: `import llamac` in the guest finds the sources the host runs ----------------------------------------------

def _stage(cache: Path) -> Path:
    """A directory for the guest's PYTHONPATH whose llamac/ mirrors the host's llamac package, with the subpackages
    that a checkout keeps elsewhere (runtime/, export/, targets/) linked in. Refreshed on every call (cheap)."""
    pkg = _package_dir("llamac")
    stage = cache / f"stage-{_key(str(pkg))}"
    dst = stage / "llamac"
    dst.mkdir(parents=True, exist_ok=True)
    want = {p.name: p for p in pkg.iterdir() if p.name != "__pycache__" and not p.name.endswith(".egg-info")}
    for sub in MAPPED_SUBPACKAGES:
        where = _package_dir(f"llamac.{sub}", required=False)
        if where is not None:
            want[sub] = where
    for name, src in want.items():
        _symlink(src, dst / name)
    for p in dst.iterdir():  # files removed from the checkout since the last run
        if p.name not in want and p.name != "__pycache__":
            try:
                p.unlink()
            except (IsADirectoryError, FileNotFoundError, PermissionError):
                pass
    return stage


def _package_dir(name: str, required: bool = True) -> Path | None:
    spec = importlib.util.find_spec(name)  # imports only the parent package (llamac/__init__.py is tiny)
    locs = list(spec.submodule_search_locations or []) if spec else []
    if not locs:
        if required:
            raise RuntimeError(f"cannot locate the {name} package to stage it for the emulated Python")
        return None
    return Path(locs[0]).resolve()


def _symlink(src: Path, link: Path) -> None:
    """Point `link` at `src`, replacing whatever is there atomically (concurrent runs may do the same)."""
    try:
        if link.is_symlink() and Path(os.readlink(link)) == src:
            return
    except OSError:
        pass
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(src, tmp)
    os.replace(tmp, link)
