"""The gateway's HTTP front: a transport beside gRPC, on the same event loop, calling
the same service code (task_manager/web/server.py)."""
