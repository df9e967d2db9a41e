from villa_plugin.distributed.base import SingleProcessStrategy, Strategy  # noqa: F401
