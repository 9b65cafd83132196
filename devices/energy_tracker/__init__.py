"""An energy tracker (metering plug) in front of another device: reports its power."""
