"""The coordinator: a pure scheduler core, recruitment, and the asyncio shell of `bgrid submit`."""
