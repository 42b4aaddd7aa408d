"""Statistics and plots of the fixed-context diagnostic (`opdlab diagnose`) and of `opdlab compare`."""
