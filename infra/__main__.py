"""Pulumi entry point: build the stack from its config and export the outputs contract."""

import pulumi

from infra import config
from infra.stack import build

stack = build(config.load(), pulumi.get_stack())
for key, value in stack.outputs.items():
    pulumi.export(key, value)
