"""Built-in prism plugins, one kind per subpackage; every module here is imported by discovery."""
