from villa_plugin.models.base_model import BaseModel  # noqa: F401
