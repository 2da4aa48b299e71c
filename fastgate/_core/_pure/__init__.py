"""Pure-Python references of the compiled modules in fastgate._core (the test oracle and benchmark baseline)."""
