"""kvdistill.cache"""
