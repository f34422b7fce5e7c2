"""The sandbox's stand-in for the customer's Heroku app: an inventory SaaS.

It runs as web and worker processes (a Heroku formation), reads ``DATABASE_URL``
from a local config-var store, honours maintenance mode and the formation, and
appends every write it saw committed to an acknowledged-write ledger, so that a
rehearsal can prove that no acknowledged write was lost and measure how long
writes were unavailable.
"""
