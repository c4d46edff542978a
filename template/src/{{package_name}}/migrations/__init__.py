"""SQL migrations, applied in file-name order by `migrations.apply`."""
