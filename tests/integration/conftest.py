"""Fixtures of the integration tier; they live in integration_stack.py (a module with a name of
its own, so that tests can import its helpers without clashing with other conftest modules)."""

from integration_stack import mlflow_server, mlflow_server_process, ray_two_nodes  # noqa: F401
