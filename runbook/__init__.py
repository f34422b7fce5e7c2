"""tern's runbook: the stateful, imperative half of the migration.

The runbook reads an environment only through the outputs contract
(:mod:`runbook.contract`) and acts on it only through adapters
(:mod:`runbook.adapters`), so the same steps drive the local sandbox and AWS/Heroku.
"""
