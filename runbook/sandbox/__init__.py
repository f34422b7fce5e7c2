"""The local sandbox: real PostgreSQL servers standing in for Heroku, the EC2 replicas and Aurora.

=========================  ==========================================================
real part                  sandbox
=========================  ==========================================================
Heroku Postgres            ``nodes/source``: the app role is no superuser and has no
                           REPLICATION; WAL leaves only through ``archive_command``
S3 bucket (WAL-G layout)   ``archive/``: ``wal/`` segments and ``basebackups/`` tars
EC2 replicas (2+ AZs)      ``nodes/ec2-*``: empty hosts, restored by ``invoke restore``
SSM Run Command            a local subprocess as the ``postgres`` OS user
Aurora                     ``nodes/aurora``: its own master role
PgBouncer poolers (NLB)    ``nodes/pooler``: one real PgBouncer (``pooler-a``), TLS,
                           transaction pooling, its ``databases.ini`` naming the
                           source; only when pgbouncer is installed (``./dev setup``)
Heroku app                 :mod:`runbook.workload` processes, ``app/state.json``
=========================  ==========================================================

The sandbox writes ``outputs.json``, the same contract a Pulumi stack exports.
"""

from .build import Sandbox

__all__ = ["Sandbox"]
