"""A light bulb: on/off and brightness; draws power while on."""
