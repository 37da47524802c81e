
other.Service