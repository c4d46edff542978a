"""Business logic, free of grpc, asyncpg and HTTP.

It declares the repository Protocols it needs and raises `errors.ServiceError`s.
"""
