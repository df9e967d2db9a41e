"""Vision-and-language trunks (one package each); see docs/adding_a_backbone.md."""
