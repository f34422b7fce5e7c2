"""What the hosts download at first boot, pinned in one place and verified before anything is installed.

The replicas install PostgreSQL from the PGDG apt repository and WAL-G from its GitHub release; the
poolers install only Debian packages (``pgbouncer``, held at ``tern:pgbouncer_version``), which apt
verifies against the AMI's own Debian archive keys. Two things arrive outside a signed apt archive:

* **WAL-G**, a release tarball: pinned by version and SHA-256, checked with ``sha256sum -c`` before it
  is unpacked. The checksum is the stack config ``tern:walg_sha256`` and has no default: tern could not
  obtain the published checksum of the pinned asset where it was written, and a made-up value would
  either stop every boot or, worse, teach operators to skip the check. ``pulumi up`` refuses a stack
  without it (README, "Real AWS, step by step", says where to get it).
* **PGDG's signing key**, fetched over HTTPS: installed only if it is the one key whose fingerprint is
  pinned here (the key PGDG publishes as ``ACCC4CF8``); apt then checks every PostgreSQL package with it.

A mismatch stops the first-boot script there (``set -e`` and an explicit ``exit 1`` with a line naming
the pin on stderr, in ``/var/log/cloud-init-output.log``): cloud-init reports ``status: error``, the host
has no PostgreSQL or no WAL-G, and ``invoke rehearse --stack`` stops at its ``hosts-ready`` step saying so.
"""

from __future__ import annotations

import re

WALG_VERSION = "v3.0.5"
WALG_ASSET = "wal-g-pg-ubuntu-22.04-amd64"          # the binary inside the tarball has the same name
WALG_SHA256: str | None = None                      # not known here: tern:walg_sha256 is required

PGDG_KEY_URL = "https://www.postgresql.org/media/keys/ACCC4CF8.asc"
PGDG_KEY_FINGERPRINT = "B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8"
PGDG_KEYRING = "/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc"

_VERSION = re.compile(r"^v[0-9]+\.[0-9]+\.[0-9]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# it ends up inside single quotes in a shell script: no quote, no whitespace, no shell metacharacter
_URL = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]+)?/[A-Za-z0-9._~/%+=-]*$")


def walg_url(version: str = WALG_VERSION) -> str:
    return f"https://github.com/wal-g/wal-g/releases/download/{version}/{WALG_ASSET}.tar.gz"


def check_walg(version: str, sha256: str | None, url: str | None) -> None:
    """The WAL-G pins, as the stack config gives them; raises ValueError naming the key."""
    if not _VERSION.match(version):
        raise ValueError(f"tern:walg_version must be a release tag such as {WALG_VERSION}, not {version!r}")
    if sha256 is not None and not _SHA256.match(sha256):
        raise ValueError("tern:walg_sha256 must be the 64 hex digits of the release tarball's SHA-256 "
                         f"(sha256sum {WALG_ASSET}.tar.gz), not {sha256!r}")
    if url is not None and not _URL.match(url):
        raise ValueError(f"tern:walg_url must be a plain https:// URL (a mirror of {WALG_ASSET}.tar.gz), not {url!r}")


def walg_install(*, version: str, sha256: str, url: str | None = None, workdir: str = "/tmp",
                 dest: str = "/usr/local/bin/wal-g") -> str:
    """The user-data lines that download WAL-G, verify it and install it as ``dest`` (``workdir`` and ``dest``
    change only for the tests, which run these lines)."""
    check_walg(version, sha256, url)
    url = url or walg_url(version)
    tarball = f"{workdir}/wal-g.tar.gz"
    return f"""# WAL-G {version}, pinned by SHA-256 (tern:walg_sha256): nothing is unpacked unless it matches
curl -fsSL --retry 5 --retry-connrefused -o {tarball} '{url}'
echo '{sha256}  {tarball}' > {tarball}.sha256
sha256sum -c {tarball}.sha256 || {{ echo "tern: {url} does not match tern:walg_sha256 {sha256}: WAL-G NOT installed, boot stopped" >&2; exit 1; }}
tar -xzf {tarball} -C {workdir} {WALG_ASSET}
install -m 0755 -o root -g root {workdir}/{WALG_ASSET} {dest}
rm -f {tarball} {tarball}.sha256 {workdir}/{WALG_ASSET}
"""


def pgdg_key_install(*, workdir: str = "/tmp", dest: str = PGDG_KEYRING) -> str:
    """The user-data lines that fetch PGDG's signing key and keep it (as ``dest``) only if it is exactly one
    key with the pinned fingerprint."""
    key = f"{workdir}/pgdg.asc"
    return f"""# PGDG's signing key, kept only if it is the pinned key ({PGDG_KEY_FINGERPRINT}) and nothing else
install -d {dest.rsplit("/", 1)[0]}
curl -fsSL --retry 5 --retry-connrefused -o {key} {PGDG_KEY_URL}
fpr=$(GNUPGHOME=$(mktemp -d) gpg --batch --show-keys --with-colons {key} | awk -F: '$1=="pub"{{p=1;next}} p&&$1=="fpr"{{print $10;p=0}}') || fpr="no OpenPGP key"
[ "$fpr" = "{PGDG_KEY_FINGERPRINT}" ] || {{ echo "tern: {PGDG_KEY_URL} is not the pinned PGDG key {PGDG_KEY_FINGERPRINT} (got: $fpr): boot stopped" >&2; exit 1; }}
install -m 0644 {key} {dest} && rm -f {key}
"""
