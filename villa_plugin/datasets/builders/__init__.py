"""One builder module per task; each registers itself when villa_plugin.components imports it."""
