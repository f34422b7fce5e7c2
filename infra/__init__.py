"""tern's Pulumi program (AWS side). One ComponentResource per module; config read only in config.py."""
