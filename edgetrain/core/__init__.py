"""The core training step: what every layer above runs, measures or plans for."""
