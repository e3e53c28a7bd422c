"""One path type for everything a run reads or writes: local directories and `gs://` buckets.

`path(p)` gives an `etils.epath.Path` (the type Orbax uses; gcsfs underneath for `gs://`): local
paths are made absolute, so `gs://b/run` can never become a local directory named `gs:`.

Cloud Storage has objects, not files: there are no directories to create, no appends and no cheap
renames (gcsfs copies then deletes). So `write_text` replaces a local file by write-then-rename and a
`gs://` object by one upload (Cloud Storage swaps an object whole: readers see the old or the new
one, never half); `makedirs` is a no-op on `gs://`.

Credentials for `gs://` are Google's application default credentials (`gcloud auth
application-default login`, `GOOGLE_APPLICATION_CREDENTIALS=key.json`, or a VM's service account).
Tests point every client at a local emulator: `STORAGE_EMULATOR_HOST` (gcsfs, google-cloud-storage)
and `TENSORSTORE_GCS_HTTP_URL` (TensorStore, so Orbax).
"""
from __future__ import annotations

import logging
import os
import uuid

from etils import epath

from keel_jax.errors import ConfigError, DataError

if os.environ.get("STORAGE_EMULATOR_HOST"):
  # gcsfs otherwise first tries its experimental gRPC client, which an emulator does not serve, and
  # waits ~60 s before falling back to the JSON API. Read when gcsfs is imported.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

CREDENTIALS_HELP = ("gs:// paths use Google application default credentials: run `gcloud auth "
                    "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
                    "account key file, or run on a VM whose service account may write the bucket")


def is_remote(p) -> bool:
  return str(p).startswith("gs://")


def path(p) -> epath.Path:
  """`p` (str or path) as an epath.Path: `gs://...` as is, anything else absolute and user-expanded."""
  text = os.fspath(p) if not isinstance(p, epath.Path) else str(p)
  if text.startswith("gs:/") and not is_remote(text):  # pathlib.Path("gs://b") collapsed the '//'
    text = "gs://" + text[len("gs:/"):]
  if is_remote(text):
    try:
      import gcsfs  # noqa: F401 -- epath needs it for gs://; say so before the first use fails obscurely
    except ImportError:
      raise ConfigError("path", text, "a local path, or install gcsfs for gs:// paths "
                        "(pip install 'keel_jax[gcs]')") from None
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def makedirs(p) -> epath.Path:
  """Creates the local directory `p` (and parents); nothing to create for `gs://` prefixes."""
  p = path(p)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
  return p


def write_text(p, text: str) -> None:
  """Replaces the file `p` whole: a reader (another host, a resumed run) sees the old text or the new,
  never a torn one."""
  p = path(p)
  if is_remote(p):
    p.write_text(text)  # one upload: Cloud Storage replaces an object atomically
    return
  tmp = p.with_name(f"{p.name}.tmp.{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, p)


def move_dir(src, dest) -> None:
  """Moves the directory `src` to `dest` (whose parent is created). Local: one rename. gs://: each
  object copied, then the originals deleted (Cloud Storage has no directory rename)."""
  src, dest = path(src), path(dest)
  if not is_remote(src):
    makedirs(dest.parent)
    os.rename(src, dest)
    return
  for f in _files_below(src):
    (dest / str(f)[len(str(src)):].lstrip("/")).write_bytes(f.read_bytes())
  src.rmtree()


def check_writable(directory, what: str = "workdir") -> epath.Path:
  """Creates `directory` if local and proves it writable with a probe file (written, then deleted).

  Raises ConfigError naming the path: a bucket that does not exist, one this process may not write,
  or missing credentials (with how to provide them). Call before any compile.
  """
  d = path(directory)
  probe = d / f".keel_write_check.{uuid.uuid4().hex[:8]}"
  gcsfs_log = logging.getLogger("gcsfs")
  level = gcsfs_log.level
  gcsfs_log.setLevel(logging.CRITICAL)  # its retries log tracebacks; the one message below says it all
  try:
    makedirs(d)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # noqa: BLE001 -- gcsfs/google-auth raise many types; all mean "cannot write"
    raise ConfigError(what, str(d), _write_failure(d, e)) from None
  finally:
    gcsfs_log.setLevel(level)
  return d


def _write_failure(d: epath.Path, e: BaseException) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())[:300]
  if not is_remote(d):
    return f"a directory this process can write ({text})"
  bucket = str(d)[len("gs://"):].split("/")[0]
  auth_words = ("credential", "401", "403", "unauthorized", "forbidden", "permission", "anonymous",
                "refresh", "token")
  if isinstance(e, PermissionError) or any(w in text.lower() for w in auth_words):
    return f"a gs:// location these credentials may write ({text}). {CREDENTIALS_HELP}"
  if isinstance(e, FileNotFoundError):
    return (f"a gs:// path in an existing bucket: bucket {bucket!r} was not found "
            f"(create it with `gcloud storage buckets create gs://{bucket}`)")
  return f"a gs:// path this process can write ({text}). {CREDENTIALS_HELP}"


def local_dir(workdir, name: str) -> str:
  """A local directory for `workdir`'s files that must be local (memory-mapped caches):
  `workdir/name` itself for a local workdir; for gs://bucket/run,
  `$KEEL_CACHE_DIR/bucket/run/name` (default ~/.cache/keel_jax)."""
  if not is_remote(workdir):
    return str(path(workdir) / name)
  root = os.environ.get("KEEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "keel_jax")
  return os.path.join(root, str(workdir)[len("gs://"):].strip("/"), name)


def _files_below(d: epath.Path) -> list[epath.Path]:
  out = []
  for p in d.iterdir():
    out.extend(_files_below(p) if p.is_dir() else [p])
  return out


def local_copy(directory, log=print) -> str:
  """A local directory with the files of `directory`: `directory` itself if local; for gs://, a copy
  under local_dir(directory, 'copy') (files already there with the same size are not fetched
  again). Memory-mapped data (prepared token files) must be local."""
  if not is_remote(directory):
    return str(path(directory))
  src, dest = path(directory), local_dir(directory, "copy")
  if not (src / "meta.json").exists():  # written last by keel_jax.prepare: marks a complete directory
    raise DataError(f"{src} is not a complete prepared data directory (no meta.json); "
                    "write one with `python -m keel_jax.prepare --out DIR`")
  for f in sorted(_files_below(src), key=lambda f: f.name == "meta.json"):
    target = os.path.join(dest, str(f)[len(str(src)):].lstrip("/"))
    if os.path.exists(target) and os.path.getsize(target) == f.stat().length:
      continue
    log(f"copying {f} to {target}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp.{os.getpid()}"
    with f.open("rb") as fin, open(tmp, "wb") as fout:
      while chunk := fin.read(64 << 20):
        fout.write(chunk)
    os.replace(tmp, target)
  return dest


def upload_dir(local: str, dest, last: str | None = None) -> None:
  """Copies every file below the local directory `local` to `dest` (local or gs://); the file at
  relative path `last` goes after all others (a completion marker)."""
  dest = path(dest)
  names = sorted(os.path.relpath(os.path.join(root, n), local) for root, _, files in os.walk(local) for n in files)
  for name in sorted(names, key=lambda n: n == last):
    target = dest / name
    makedirs(target.parent)
    with open(os.path.join(local, name), "rb") as fin, target.open("wb") as fout:
      while chunk := fin.read(64 << 20):
        fout.write(chunk)
