"""The two failovers: ``ec2`` (Heroku -> EC2, physical) and, later, ``aurora`` (EC2 -> Aurora, logical)."""
