"""The invoke task layer: flags, config, output. Domain errors become ``invoke.Exit`` here, and only here."""

from invoke import Collection

from . import environment, failover, infrastructure, rehearsal, sandbox, verification


def build_namespace() -> Collection:
    ns = Collection()
    ns.add_collection(Collection.from_module(sandbox), name="sandbox")
    for module in (environment, failover, infrastructure, rehearsal, verification):
        for t in Collection.from_module(module).tasks.values():
            ns.add_task(t)
    ns.configure({"tern": {}})
    return ns
