"""The Pulumi program: the AWS side of the migration (filled in by the infra issue)."""
