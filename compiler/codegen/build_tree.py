"""Writing a build directory without losing anything a user put there.

A build directory carries a manifest, `.dsvc-build`, of every file dsvc wrote
into it with its sha256 (written by `build.render_files`). `write_tree` replaces
exactly those files on a recompile and leaves everything else alone (it names
what it left and which generated files had been edited); `check_output_dir`
finds what it would refuse before anything is rendered. docs/limits.md states
the rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import stat

BUILD_MARKER = ".dsvc-build"


def write_tree(files: dict[str, bytes], out_dir: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Write `files` into `out_dir`, created if missing (permissions from the umask).

    A directory a previous compile wrote (its `.dsvc-build` manifest lists every file
    dsvc wrote, with its hash) gets exactly those files replaced, or removed when this
    build has no such file; anything else in it, files a user added, is left alone.
    A non-empty directory without a manifest is refused, and so is a file of this build
    whose place something of the user's holds. Every file is first written beside its
    target, then all are renamed into place and the manifest last: a failure before the
    renames changes nothing, one during them leaves a manifest that no longer matches,
    so `dsvc train` rebuilds. Returns (entries dsvc did not write, left alone; files of
    the previous build edited since, now replaced), as paths relative to `out_dir`.
    """
    from dsvc.compiler.cli import output_error

    out = pathlib.Path(out_dir)
    try:
        old = _previous_manifest(out, out_dir)
    except OSError as err:
        raise output_error(out_dir, err) from None
    rels = sorted(files, key=lambda rel: rel == BUILD_MARKER)  # the manifest last
    for rel in rels:
        _check_place(out, rel, old, out_dir)
    edited = tuple(rel for rel in sorted(old) if rel in files and rel != BUILD_MARKER
                   and digest(out / rel) != old[rel])
    kept = _others(out, set(old) | set(files))
    created: list[pathlib.Path] = []
    temps: list[tuple[pathlib.Path, pathlib.Path]] = []
    try:
        for rel in rels:
            target = out / rel
            _make_dirs(target.parent, created)
            tmp = target.with_name(f".{target.name}.dsvc-{os.getpid()}.tmp")
            with open(tmp, "xb") as f:
                f.write(files[rel])
            temps.append((tmp, target))
    except OSError as err:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise output_error(out_dir, err) from None
    try:
        for tmp, target in temps[:-1]:
            os.replace(tmp, target)
        for rel in sorted(set(old) - set(files)):  # the previous build's, no longer built
            stale = out / rel
            if _inside(out, stale) and not stale.is_symlink() and stale.is_file():
                stale.unlink()
                _prune(out, stale.parent)
        os.replace(*temps[-1])
    except OSError as err:
        raise output_error(out_dir, err) from None
    return kept, edited


def _previous_manifest(out: pathlib.Path, out_dir: str) -> dict[str, str]:
    """rel -> sha256 of the files the previous compile into `out` wrote ({} for a new or
    empty directory); a `UsageError` for anything else dsvc must not write into."""
    from dsvc.compiler.cli import UsageError
    from dsvc.runtime.inputs import InputError, load_json

    try:
        st = out.lstat()
    except FileNotFoundError:
        _check_parents(out, out_dir)
        return {}
    except NotADirectoryError:
        _check_parents(out, out_dir)
        raise
    if not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UsageError(f"{out_dir} exists and is {what}; a build is written into a directory")
    marker = out / BUILD_MARKER
    if not os.path.lexists(marker):
        if any(out.iterdir()):
            raise UsageError(f"{out_dir} is a non-empty directory that is not a dsvc build; "
                             "refusing to write into it (choose another -o)")
        return {}
    try:
        manifest = load_json(marker).get("files")
        if not isinstance(manifest, dict) or not all(
                isinstance(v, str) and _plain_relative(k) for k, v in manifest.items()):
            raise ValueError
    except (InputError, ValueError, AttributeError):
        raise UsageError(f"{out_dir}: its {BUILD_MARKER} is not a dsvc build manifest; refusing "
                         "to write into it (choose another -o, or remove that file)") from None
    return dict(manifest)


def _check_parents(out: pathlib.Path, out_dir: str) -> None:
    """The nearest existing ancestor of `out` must be a directory (`-o afile/build`)."""
    from dsvc.compiler.cli import UsageError

    for parent in out.absolute().parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UsageError(f"{out_dir}: '{parent}' is a file, not a directory")
            return


def _plain_relative(rel: str) -> bool:
    """A manifest entry dsvc could have written: relative, normalised, no `..`."""
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and "\\" not in rel \
        and all(p not in ("", ".", "..") for p in parts)


def _check_place(out: pathlib.Path, rel: str, old: dict, out_dir: str) -> None:
    """`rel` may be written: every directory on its way is a real directory, and the place
    itself is free or holds the previous build's regular file."""
    from dsvc.compiler.cli import UsageError

    here = out
    for part in rel.split("/")[:-1]:
        here = here / part
        if os.path.islink(here) or (os.path.lexists(here) and not here.is_dir()):
            raise UsageError(f"{out_dir}: '{here.relative_to(out)}' is in the way of the build's "
                             f"{rel} (not a directory dsvc made); move it and compile again")
    target = out / rel
    if not os.path.lexists(target) or rel == BUILD_MARKER:  # an existing one was read above
        return
    if rel not in old or os.path.islink(target) or not target.is_file():
        raise UsageError(f"{out_dir}: '{rel}' exists but dsvc did not write it; move it away "
                         "(dsvc never replaces a file it did not write) and compile again")


def _others(out: pathlib.Path, ours: set[str]) -> tuple[str, ...]:
    """Entries under `out` that are neither dsvc's files nor directories holding them; a
    user's directory is named once ("mydata/"); Python's __pycache__ is not named."""
    if not out.is_dir():
        return ()
    dirs = {str(pathlib.PurePosixPath(rel).parent) for rel in ours}
    dirs |= {str(p) for rel in ours for p in pathlib.PurePosixPath(rel).parents}
    found: list[str] = []
    for root, subdirs, names in os.walk(out):
        rel_root = pathlib.Path(root).relative_to(out).as_posix()
        keep_walking = []
        for d in sorted(subdirs):
            rel = d if rel_root == "." else f"{rel_root}/{d}"
            if d == "__pycache__":
                continue
            if rel in dirs and not os.path.islink(os.path.join(root, d)):
                keep_walking.append(d)
            else:
                found.append(rel + "/")
        subdirs[:] = keep_walking
        for name in sorted(names):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel not in ours and ".dsvc-" not in name:
                found.append(rel)
    return tuple(sorted(found))


def _make_dirs(path: pathlib.Path, created: list[pathlib.Path]) -> None:
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir()  # mode 0o777 less the umask, as any program's
        created.append(d)


def _inside(out: pathlib.Path, path: pathlib.Path) -> bool:
    """`path` resolves inside `out` (no symlink on the way leads elsewhere)."""
    root = os.path.realpath(out)
    return os.path.realpath(path).startswith(root + os.sep)


def _prune(out: pathlib.Path, d: pathlib.Path) -> None:
    """Remove `d` and its parents up to `out` while empty (directories of removed files)."""
    while d != out and _inside(out, d):
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def digest(path: pathlib.Path) -> str | None:
    """sha256 of a regular file of a build, None when it is missing or not one (read under
    the input policy: a symlink to /dev/zero in a build directory cannot hang dsvc)."""
    from dsvc.runtime.inputs import JSON_BYTES, InputError, read_bytes

    try:
        return hashlib.sha256(read_bytes(path, JSON_BYTES)).hexdigest()
    except InputError:
        return None


def check_output_dir(out_dir: str) -> None:
    """What `write_tree` would refuse, found before anything is rendered (seconds for a big
    model): a directory that is not a dsvc build, a file in the way, a place dsvc cannot
    create files in (a read-only file system, /proc). Changes nothing on disk."""
    from dsvc.compiler.cli import UsageError, output_error
    from dsvc.runtime.inputs import InputError, check_writable_dir

    try:
        _previous_manifest(pathlib.Path(out_dir), out_dir)
        check_writable_dir(out_dir)
    except InputError as err:
        raise UsageError(f"cannot write {err}") from None
    except OSError as err:
        raise output_error(out_dir, err) from None
