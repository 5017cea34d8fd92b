"""Request handling: the parsers that turn a request body into what plugins see."""
