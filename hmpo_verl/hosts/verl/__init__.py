"""The verl adapter: configs, policy losses, advantage estimators, registration, the plugin entry point."""
